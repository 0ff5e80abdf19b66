"""The plain flash-attention baseline of the compile report (kernels/flash_reference.py) computes
causal softmax attention: checked in float64 against torch's own math, forward and backward, so the
report's instructions-per-score ratio compares TAPA with a correct kernel."""

import math

import torch

from tapa_kernels.flash_reference import flash_bwd, flash_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def causal_attention(q, k, v):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_flash_reference_matches_causal_softmax_attention():
    gen = torch.Generator().manual_seed(0)
    heads, seqlen, head_dim = 2, 80, 32  # 80: a partial last tile of 32
    q, k, v, do = (torch.randn(heads, seqlen, head_dim, generator=gen).to(DEVICE) for _ in range(4))
    out, lse = flash_fwd(q, k, v)
    dq, dk, dv = flash_bwd(do, q, k, v, out, lse)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out = causal_attention(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), do.double())
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=2e-5, rtol=2e-5)
    for name, grad, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        torch.testing.assert_close(grad.double(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
