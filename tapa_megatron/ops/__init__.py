"""The TAPA attention op: one entry point, three implementations side by side.

    reference.py  the formula with the full score matrix (the oracle, any dtype)
    blockwise.py  PyTorch, block-wise online softmax, O(seq * block) memory (CPU training)
    triton.py     autograd Function over the fused Triton kernels in `tapa_kernels` (GPU)

Every path returns (out, lse) for the positions it is given, so results over disjoint key sets
merge exactly (see `merge_partials`); context parallelism builds on that contract.
"""

import os

import torch

from tapa_megatron.ops import blockwise, reference

PHASES = ("quadratic", "linear")
BACKENDS = ("auto", "torch", "triton", "reference")

__all__ = ["tapa_attention", "tapa_attention_varlen", "tapa_attention_backward", "tapa_attention_varlen_backward",
           "merge_partials", "amplitude_dim", "PHASES", "BACKENDS"]


def amplitude_dim(head_dim: int, theta: float) -> int:
    """A = theta * D, the amplitude width; the phase part gets the other D - A dims."""
    if not 0.0 < theta < 1.0:
        raise ValueError(f"theta={theta} must lie strictly between 0 and 1 (the paper uses 0.5).")
    amp = theta * head_dim
    if abs(amp - round(amp)) > 1e-6:
        raise ValueError(
            f"theta * head_dim = {theta} * {head_dim} = {amp} is not an integer: the amplitude part must be a "
            f"whole number of dims. Pick theta so that theta * {head_dim} is an integer (e.g. 0.25, 0.5, 0.75)."
        )
    return int(round(amp))


def _check_options(alpha, phase, backend):
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0 (the paper uses 0.1).")
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is unknown; use one of {PHASES}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}.")


def _check_qkv(q, k, v, seq_dims):
    """Shapes, dtypes and devices of q, k, v; seq_dims is 4 (batched) or 3 (packed)."""
    names = ("q", "k", "v")
    for name, t in zip(names, (q, k, v)):
        if t.dim() != seq_dims:
            layout = "(batch, seq, heads, head_dim)" if seq_dims == 4 else "(total_tokens, heads, head_dim)"
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {seq_dims} dims {layout}.")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}; q, k, v must be floating point.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}).")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape.")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}.")
    if seq_dims == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"q batch {q.shape[0]} != k batch {k.shape[0]}.")
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if heads_q % heads_kv != 0:
        raise ValueError(
            f"heads_q={heads_q} is not a multiple of heads_kv={heads_kv}: grouped-query attention needs each "
            f"key/value head shared by a whole number of query heads."
        )


def _positions(pos, batch, seq, device, name):
    """Normalise positions to int64 (batch, seq); None means arange(seq)."""
    if pos is None:
        return torch.arange(seq, device=device).expand(batch, seq)
    if pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} has dtype {pos.dtype}; positions must be integer (int64) token positions.")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but q/k/v are on {device}.")
    if pos.shape == (seq,):
        return pos.long().expand(batch, seq)
    if pos.shape == (batch, seq):
        return pos.long()
    raise ValueError(f"{name} has shape {tuple(pos.shape)}; expected ({seq},) or ({batch}, {seq}).")


def _lse_dtype(lse):
    """lse is float32, or float64 for float64 inputs."""
    return lse.to(torch.promote_types(lse.dtype, torch.float32))


def _resolve_backend(backend, q):
    if backend != "auto":
        if backend == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels in Triton's CPU "
                "interpreter); use backend='torch' on CPU."
            )
        return backend
    return "triton" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) else "torch"


def _prepare_batched(q, k, v, q_pos, k_pos, alpha, theta, phase, causal, backend):
    """Validate a batched call; returns positions (B, S), the kernels' options and the backend to run."""
    _check_options(alpha, phase, backend)
    _check_qkv(q, k, v, seq_dims=4)
    amp_dim = amplitude_dim(q.shape[-1], theta)
    batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
    q_pos = _positions(q_pos, batch, seq_q, q.device, "q_pos")
    k_pos = _positions(k_pos, batch, seq_k, q.device, "k_pos")
    options = dict(alpha=alpha, amp_dim=amp_dim, phase=phase, causal=causal)
    return q_pos, k_pos, options, _resolve_backend(backend, q)


def tapa_attention(
    q,
    k,
    v,
    *,
    alpha=0.1,
    theta=0.5,
    phase="quadratic",
    causal=True,
    q_pos=None,
    k_pos=None,
    return_lse=False,
    backend="auto",
):
    """TAPA attention over batched sequences.

    q: (batch, seq_q, heads_q, D); k, v: (batch, seq_k, heads_kv, D) with heads_q % heads_kv == 0.
    q_pos, k_pos: integer absolute positions, (seq,) or (batch, seq); default arange. The causal mask
    (key visible iff k_pos <= q_pos) and the distances |m - n| come from them, not from indices.
    Returns out (batch, seq_q, heads_q, D), and with return_lse also lse (batch, heads_q, seq_q) in fp32;
    a query with no visible key gets out = 0 and lse = -inf.
    """
    q_pos, k_pos, options, backend = _prepare_batched(q, k, v, q_pos, k_pos, alpha, theta, phase, causal, backend)
    if backend == "reference":
        out, lse = reference.tapa_attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, **options)
        lse = _lse_dtype(lse)
    elif backend == "torch":
        out, lse = blockwise.tapa_attention_blockwise(q, k, v, q_pos=q_pos, k_pos=k_pos, **options)
    else:
        from tapa_megatron.ops import triton as triton_path

        out, lse = triton_path.tapa_attention_triton(q, k, v, q_pos=q_pos, k_pos=k_pos, **options)
    return (out, lse) if return_lse else out


def _check_cu_seqlens(cu, total, name, device):
    if cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D integer tensor [0, end_1, ..., total] with at least 2 entries.")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q/k/v are on {device}.")
    cu_list = cu.tolist()
    if cu_list[0] != 0 or cu_list[-1] != total or any(b < a for a, b in zip(cu_list, cu_list[1:])):
        raise ValueError(f"{name}={cu_list} must start at 0, never decrease and end at the token count {total}.")
    return cu_list


def _varlen_positions(pos, cu_list, device, name):
    if pos is None:  # positions restart at 0 in every document
        return torch.cat([torch.arange(b - a, device=device) for a, b in zip(cu_list, cu_list[1:])])
    if pos.dtype not in (torch.int64, torch.int32) or pos.shape != (cu_list[-1],):
        raise ValueError(f"{name} must be integer positions of shape ({cu_list[-1]},), got {pos.dtype} {tuple(pos.shape)}.")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but q/k/v are on {device}.")
    return pos.long()


def _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos, k_pos, alpha, theta,
                    phase, causal, backend):
    """Validate a packed call; returns the document bounds as lists, positions, options and backend."""
    _check_options(alpha, phase, backend)
    _check_qkv(q, k, v, seq_dims=3)
    amp_dim = amplitude_dim(q.shape[-1], theta)
    cu_q = _check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q", q.device)
    cu_k = _check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k", q.device)
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q) - 1} documents but cu_seqlens_k has {len(cu_k) - 1}.")
    for name, cu, bound in (("max_seqlen_q", cu_q, max_seqlen_q), ("max_seqlen_k", cu_k, max_seqlen_k)):
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        if longest > bound:
            raise ValueError(f"{name}={bound} is smaller than the longest document ({longest} tokens).")
    q_pos = _varlen_positions(q_pos, cu_q, q.device, "q_pos")
    k_pos = _varlen_positions(k_pos, cu_k, q.device, "k_pos")
    options = dict(alpha=alpha, amp_dim=amp_dim, phase=phase, causal=causal)
    return cu_q, cu_k, q_pos, k_pos, options, _resolve_backend(backend, q)


def tapa_attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    alpha=0.1,
    theta=0.5,
    phase="quadratic",
    causal=True,
    q_pos=None,
    k_pos=None,
    return_lse=False,
    backend="auto",
):
    """TAPA attention over packed documents (flash-attn's varlen layout).

    q: (total_q, heads_q, D); k, v: (total_k, heads_kv, D). Document i owns tokens
    cu_seqlens[i]:cu_seqlens[i+1]; documents never attend to each other. Positions restart at 0 in
    each document unless q_pos / k_pos (shape (total,)) are given. lse has shape (heads_q, total_q).
    """
    cu_q, cu_k, q_pos, k_pos, options, backend = _prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos, k_pos, alpha, theta, phase, causal,
        backend)
    if backend == "triton":
        from tapa_megatron.ops import triton as triton_path

        out, lse = triton_path.tapa_attention_varlen_triton(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos=q_pos, k_pos=k_pos, **options
        )
        return (out, lse) if return_lse else out
    # Reference and torch paths: one document at a time as a batch of one; autograd joins the pieces.
    single = reference.tapa_attention_reference if backend == "reference" else blockwise.tapa_attention_blockwise
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        out, lse = single(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], q_pos=q_pos[None, q0:q1], k_pos=k_pos[None, k0:k1], **options
        )
        outs.append(out[0])
        lses.append(_lse_dtype(lse[0]))
    return (torch.cat(outs), torch.cat(lses, dim=1)) if return_lse else torch.cat(outs)


def tapa_attention_backward(d_out, q, k, v, out, lse, *, d_lse=None, alpha=0.1, theta=0.5, phase="quadratic",
                            causal=True, q_pos=None, k_pos=None, backend="auto"):
    """dq, dk, dv of attention over these keys, given the final out and lse of a softmax that may span
    more keys than k holds (merged from partials). This is the backward half of the (out, lse)
    contract: context parallelism computes each key block's share of the gradients with it.

    Layout as in `tapa_attention`; out (B, Sq, Hq, D), lse (B, Hq, Sq) from the merged result; d_lse,
    optional, the gradient arriving at lse.
    """
    q_pos, k_pos, options, backend = _prepare_batched(q, k, v, q_pos, k_pos, alpha, theta, phase, causal, backend)
    if backend == "triton":
        from tapa_megatron.ops import triton as triton_path

        return triton_path.tapa_attention_triton_backward(d_out, q, k, v, out, lse, d_lse=d_lse, q_pos=q_pos,
                                                          k_pos=k_pos, **options)
    return blockwise.tapa_attention_blockwise_backward(d_out, q, k, v, out, lse, d_lse=d_lse, q_pos=q_pos,
                                                       k_pos=k_pos, **options)


def tapa_attention_varlen_backward(d_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   *, d_lse=None, alpha=0.1, theta=0.5, phase="quadratic", causal=True, q_pos=None,
                                   k_pos=None, backend="auto"):
    """`tapa_attention_backward` for the packed layout: out (total_q, Hq, D), lse (Hq, total_q)."""
    cu_q, cu_k, q_pos, k_pos, options, backend = _prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos, k_pos, alpha, theta, phase, causal,
        backend)
    if backend == "triton":
        from tapa_kernels import tapa_bwd

        return tapa_bwd(d_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos,
                        k_pos, dlse=d_lse, **options)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        doc_grads = blockwise.tapa_attention_blockwise_backward(
            d_out[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1], lse[None, :, q0:q1],
            d_lse=None if d_lse is None else d_lse[None, :, q0:q1], q_pos=q_pos[None, q0:q1],
            k_pos=k_pos[None, k0:k1], **options)
        for grad, doc_grad, (start, end) in zip(grads, doc_grads, ((q0, q1), (k0, k1), (k0, k1))):
            grad[start:end] = doc_grad[0]
    return grads


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Exact softmax merge of two partial attentions over disjoint key sets.

    out: (..., seq, heads, D), lse: (..., heads, seq) fp32. Rows where both lse are -inf stay 0 / -inf.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - finite).transpose(-1, -2).unsqueeze(-1)
    weight_b = torch.exp(lse_b - finite).transpose(-1, -2).unsqueeze(-1)
    compute = torch.promote_types(out_a.dtype, torch.float32)
    out = weight_a * out_a.to(compute) + weight_b * out_b.to(compute)
    return out.to(out_a.dtype), lse
