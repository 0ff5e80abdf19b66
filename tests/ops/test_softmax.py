"""The baselines' softmax op (ops/softmax.py) against the formula in float64: out, lse, and the
analytic backward (with a gradient arriving at lse, as the ring gives it) against autograd."""

import torch

from tapa_megatron.ops.softmax import (
    softmax_attention,
    softmax_attention_backward,
    softmax_attention_varlen,
    softmax_attention_varlen_backward,
)


def _formula(q, k, v, q_pos, k_pos, scale):
    """(out, lse) by autograd-able dense maths: (B, S, H, D) inputs, GQA by repeating kv heads."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
    scores = qh @ kh.transpose(-1, -2) * scale
    scores = scores.masked_fill(~(k_pos[None, :] <= q_pos[:, None]), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return (torch.softmax(scores, -1) @ vh).transpose(1, 2), lse


def _inputs(seed, batch, seq_q, seq_k, heads_q, heads_kv):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads_q, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, seq_k, heads_kv, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, seq_k, heads_kv, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    return q, k, v, gen


def test_forward_and_backward_match_the_formula(monkeypatch):
    monkeypatch.setattr("tapa_megatron.ops.softmax.QUERY_BLOCK", 5)  # several query blocks
    q, k, v, gen = _inputs(0, 2, 12, 20, 4, 2)
    q_pos, k_pos = torch.arange(12) + 8, torch.arange(20)  # queries are the last 12 of 20 keys' positions
    out, lse = softmax_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, return_lse=True, scale=0.3)
    ref_out, ref_lse = _formula(q, k, v, q_pos, k_pos, 0.3)
    assert (out - ref_out).abs().max() < 1e-12 and (lse - ref_lse).abs().max() < 1e-12
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), (q, k, v))
    grads = softmax_attention_backward(d_out, q, k, v, out, lse, d_lse=d_lse, q_pos=q_pos, k_pos=k_pos, scale=0.3)
    for grad, reference in zip(grads, expected):
        assert (grad - reference).abs().max() < 1e-10


def test_packed_documents_do_not_see_each_other():
    q, k, v, gen = _inputs(1, 1, 14, 14, 2, 1)
    cu = torch.tensor([0, 5, 14])
    out, lse = softmax_attention_varlen(q[0], k[0], v[0], cu, cu, return_lse=True)
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = softmax_attention_varlen_backward(d_out, q[0], k[0], v[0], out, lse, cu, cu)
    pieces = [_formula(q[:, a:b], k[:, a:b], v[:, a:b], torch.arange(b - a), torch.arange(b - a), 16 ** -0.5)[0]
              for a, b in ((0, 5), (5, 14))]
    ref_out = torch.cat(pieces, dim=1)[0]
    expected = torch.autograd.grad((ref_out * d_out).sum(), (q, k, v))
    assert (out - ref_out).abs().max() < 1e-12
    for grad, reference in zip(grads, expected):
        assert (grad - reference[0]).abs().max() < 1e-10
