"""TAPA attention on the fused Triton kernels (`tapa_kernels`), with autograd.

Inputs are validated by `tapa_megatron.ops.tapa_attention*`; the kernel launchers only check what
the kernels themselves need. On CPU tensors the kernels run in Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported), which is how CI tests this path.
"""

import torch

from tapa_kernels import tapa_bwd, tapa_fwd

__all__ = ["TapaTritonFunction", "tapa_attention_varlen_triton", "tapa_attention_triton", "tapa_attention_triton_backward"]


class TapaTritonFunction(torch.autograd.Function):
    """(out, lse) = TAPA attention over packed documents; differentiable wrt q, k, v through both outputs."""

    @staticmethod
    def forward(
        ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos, k_pos,
        alpha, amp_dim, phase, causal,
    ):
        options = dict(alpha=alpha, amp_dim=amp_dim, phase=phase, causal=causal)
        out, lse = tapa_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos, k_pos, **options)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos)
        ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
        ctx.options = options
        # Gradients arrive as None for an unused output: lse is often unused, and then the
        # backward skips its term instead of reading a tensor of zeros.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = tapa_bwd(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, q_pos, k_pos,
            dlse=dlse, **ctx.options,
        )
        return dq, dk, dv, *([None] * 10)


def tapa_attention_varlen_triton(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, q_pos, k_pos, alpha, amp_dim, phase, causal
):
    """Packed layout: q (total_q, Hq, D), k/v (total_k, Hkv, D), positions int64 (total,).

    Returns out (total_q, Hq, D) and lse (Hq, total_q) fp32.
    """
    return TapaTritonFunction.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos, k_pos, alpha, amp_dim, phase, causal
    )


def tapa_attention_triton(q, k, v, *, q_pos, k_pos, alpha, amp_dim, phase, causal):
    """Batched layout: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), positions int64 (B, S).

    Runs as B packed documents of equal length. Returns out (B, Sq, Hq, D) and lse (B, Hq, Sq) fp32
    (a view of the kernel's (Hq, B * Sq) lse).
    """
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k = k.shape[1]
    docs = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    out, lse = tapa_attention_varlen_triton(
        q.reshape(batch * seq_q, heads_q, head_dim),
        k.reshape(batch * seq_k, *k.shape[2:]),
        v.reshape(batch * seq_k, *v.shape[2:]),
        docs * seq_q,
        docs * seq_k,
        seq_q,
        seq_k,
        q_pos=q_pos.reshape(-1),
        k_pos=k_pos.reshape(-1),
        alpha=alpha,
        amp_dim=amp_dim,
        phase=phase,
        causal=causal,
    )
    return out.view(batch, seq_q, heads_q, head_dim), lse.view(heads_q, batch, seq_q).transpose(0, 1)


def tapa_attention_triton_backward(d_out, q, k, v, out, lse, *, d_lse=None, q_pos, k_pos, alpha, amp_dim, phase,
                                   causal):
    """dq, dk, dv for the batched layout given a (possibly merged) out (B, Sq, Hq, D) and lse (B, Hq, Sq):
    the kernels' backward without autograd, for context parallelism's per-block gradients."""
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k = k.shape[1]
    docs = torch.arange(batch + 1, dtype=torch.int32, device=q.device)

    def flat(x, seq):
        return x.reshape(batch * seq, *x.shape[2:])

    def flat_lse(x):
        return None if x is None else x.transpose(0, 1).reshape(heads_q, batch * seq_q).float().contiguous()

    dq, dk, dv = tapa_bwd(
        flat(d_out, seq_q).contiguous(), flat(q, seq_q), flat(k, seq_k), flat(v, seq_k), flat(out, seq_q),
        flat_lse(lse), docs * seq_q, docs * seq_k, seq_q, seq_k, q_pos.reshape(-1), k_pos.reshape(-1),
        dlse=flat_lse(d_lse), alpha=alpha, amp_dim=amp_dim, phase=phase, causal=causal,
    )
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
