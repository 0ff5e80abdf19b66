"""Plain causal softmax attention with TAPA's (out, lse) contract: the score of the RoPE and NoPE
baselines (RoPE rotates q and k before they get here), so context parallelism runs them through the
same schemes as TAPA (see tapa_megatron/parallel).

    s(m, n) = q_m . k_n * scale,  key n visible iff k_pos[n] <= q_pos[m]

Written as the formula reads (the full score matrix), one query block at a time so memory stays
O(block * seq_k); the backward is the analytic one, given the final (merged) out and lse. On GPU the
baselines use Transformer Engine's attention instead when it is importable (see model/specs.py).
"""

import torch

from tapa_megatron.ops import _check_cu_seqlens, _check_qkv, _positions, _varlen_positions

QUERY_BLOCK = 1024

__all__ = ["softmax_attention", "softmax_attention_backward", "softmax_attention_varlen",
           "softmax_attention_varlen_backward"]


def _compute_dtype(q):
    return torch.promote_types(q.dtype, torch.float32)


def _heads_first(q, k, v):
    """(B, S, H, D) -> (B, H, S, D) in the compute dtype, key/value heads repeated for GQA."""
    group = q.shape[2] // k.shape[2]
    dtype = _compute_dtype(q)
    qh = q.transpose(1, 2).to(dtype)
    kh = k.transpose(1, 2).to(dtype).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).to(dtype).repeat_interleave(group, dim=1)
    return qh, kh, vh


def _scores(qh, kh, q_pos, k_pos, rows, scale, causal):
    """Scores of query rows against all keys, (B, H, rows, Sk), -inf where masked."""
    scores = qh[:, :, rows] @ kh.transpose(-1, -2) * scale
    if causal:
        visible = (k_pos[:, None, :] <= q_pos[:, rows, None])[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _probabilities(scores, lse):
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite[..., None])  # a row with no visible key: all 0, not NaN


def _scale(scale, head_dim):
    return head_dim ** -0.5 if scale is None else scale


def softmax_attention(q, k, v, *, causal=True, q_pos=None, k_pos=None, return_lse=False, scale=None):
    """Causal softmax attention over batched sequences, masked by positions.

    q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D); positions (S,) or (B, S), default arange.
    Returns out (B, Sq, Hq, D) and with return_lse lse (B, Hq, Sq) in fp32 (fp64 for fp64 inputs).
    Differentiable by autograd; the ring pairs it with `softmax_attention_backward` instead.
    """
    _check_qkv(q, k, v, seq_dims=4)
    q_pos = _positions(q_pos, q.shape[0], q.shape[1], q.device, "q_pos")
    k_pos = _positions(k_pos, k.shape[0], k.shape[1], q.device, "k_pos")
    scale = _scale(scale, q.shape[-1])
    qh, kh, vh = _heads_first(q, k, v)
    outs, lses = [], []
    for start in range(0, q.shape[1], QUERY_BLOCK):
        rows = slice(start, start + QUERY_BLOCK)
        scores = _scores(qh, kh, q_pos, k_pos, rows, scale, causal)
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(_probabilities(scores, lse) @ vh)
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    lse = torch.cat(lses, dim=2)
    return (out, lse) if return_lse else out


def softmax_attention_backward(d_out, q, k, v, out, lse, *, d_lse=None, causal=True, q_pos=None, k_pos=None,
                               scale=None):
    """dq, dk, dv of softmax attention over these keys, given the final out and lse of a softmax that may
    span more keys than k holds (the backward half of the (out, lse) contract).

    With P = exp(s - lse): dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O) + d_lse), dQ = dS K scale,
    dK = dS^T Q scale.
    """
    _check_qkv(q, k, v, seq_dims=4)
    q_pos = _positions(q_pos, q.shape[0], q.shape[1], q.device, "q_pos")
    k_pos = _positions(k_pos, k.shape[0], k.shape[1], q.device, "k_pos")
    scale = _scale(scale, q.shape[-1])
    qh, kh, vh = _heads_first(q, k, v)
    dtype = qh.dtype
    d_out_h, out_h = d_out.transpose(1, 2).to(dtype), out.transpose(1, 2).to(dtype)
    lse = lse.to(dtype)
    dq = torch.zeros_like(qh)
    dk, dv = torch.zeros_like(kh), torch.zeros_like(vh)
    for start in range(0, q.shape[1], QUERY_BLOCK):
        rows = slice(start, start + QUERY_BLOCK)
        probs = _probabilities(_scores(qh, kh, q_pos, k_pos, rows, scale, causal), lse[:, :, rows])
        row_term = (d_out_h[:, :, rows] * out_h[:, :, rows]).sum(-1, keepdim=True)
        if d_lse is not None:
            row_term = row_term - d_lse[:, :, rows, None].to(dtype)
        d_scores = probs * (d_out_h[:, :, rows] @ vh.transpose(-1, -2) - row_term)
        dv += probs.transpose(-1, -2) @ d_out_h[:, :, rows]
        dq[:, :, rows] = d_scores @ kh * scale
        dk += d_scores.transpose(-1, -2) @ qh[:, :, rows] * scale
    group = q.shape[2] // k.shape[2]
    batch, heads_kv, seq_k, head_dim = k.shape[0], k.shape[2], k.shape[1], k.shape[3]
    dk = dk.reshape(batch, heads_kv, group, seq_k, head_dim).sum(2)  # GQA: sum over the heads sharing a kv head
    dv = dv.reshape(batch, heads_kv, group, seq_k, head_dim).sum(2)
    return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


def _documents(q, k, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos):
    cu_q = _check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q", q.device)
    cu_k = _check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k", q.device)
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q) - 1} documents but cu_seqlens_k has {len(cu_k) - 1}.")
    q_pos = _varlen_positions(q_pos, cu_q, q.device, "q_pos")
    k_pos = _varlen_positions(k_pos, cu_k, q.device, "k_pos")
    return list(zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:]))), q_pos, k_pos


def softmax_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                             causal=True, q_pos=None, k_pos=None, return_lse=False, scale=None):
    """`softmax_attention` over packed documents: q (total_q, Hq, D), lse (Hq, total_q); documents never
    attend to each other and positions restart at 0 in each unless given."""
    documents, q_pos, k_pos = _documents(q, k, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos)
    outs, lses = [], []
    for (q0, q1), (k0, k1) in documents:
        out, lse = softmax_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], q_pos=q_pos[None, q0:q1],
                                     k_pos=k_pos[None, k0:k1], causal=causal, return_lse=True, scale=scale)
        outs.append(out[0])
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def softmax_attention_varlen_backward(d_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                                      max_seqlen_k=None, *, d_lse=None, causal=True, q_pos=None, k_pos=None,
                                      scale=None):
    """`softmax_attention_backward` for the packed layout: out (total_q, Hq, D), lse (Hq, total_q)."""
    documents, q_pos, k_pos = _documents(q, k, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for (q0, q1), (k0, k1) in documents:
        doc_grads = softmax_attention_backward(
            d_out[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1], lse[None, :, q0:q1],
            d_lse=None if d_lse is None else d_lse[None, :, q0:q1], q_pos=q_pos[None, q0:q1], k_pos=k_pos[None, k0:k1],
            causal=causal, scale=scale)
        for grad, doc_grad, (start, end) in zip(grads, doc_grads, ((q0, q1), (k0, k1), (k0, k1))):
            grad[start:end] = doc_grad[0]
    return grads
