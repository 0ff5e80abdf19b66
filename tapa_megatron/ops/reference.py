"""TAPA attention, written as the formula reads: the oracle every other path is tested against.

Materialises the full (seq_q, seq_k) score matrix, so it is for tests and small inputs only.
It runs in the dtype it is given (float64 included) and is differentiated by plain autograd.

    s(m, n) = (q_A . k_A) / sqrt(A) * cos(2 pi |m - n|^alpha (q_P . k_P) / sqrt(P))
"""

import math

import torch


def distance_power(q_pos: torch.Tensor, k_pos: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """|m - n|^alpha for every (query, key) pair, 0 where m == n. Shapes (..., Sq), (..., Sk) -> (..., Sq, Sk)."""
    distance = (q_pos[..., :, None] - k_pos[..., None, :]).abs().to(dtype)
    return torch.where(distance > 0, distance.pow(alpha), torch.zeros((), dtype=dtype))


def tapa_scores(q, k, q_pos, k_pos, *, alpha, amp_dim, phase):
    """Pre-softmax TAPA scores. q: (B, H, Sq, D), k: (B, H, Sk, D), positions (B, S). Returns (B, H, Sq, Sk)."""
    phase_dim = q.shape[-1] - amp_dim
    q_amp, q_phase = q[..., :amp_dim], q[..., amp_dim:]
    k_amp, k_phase = k[..., :amp_dim], k[..., amp_dim:]
    amplitude = q_amp @ k_amp.transpose(-1, -2) / math.sqrt(amp_dim)
    if phase == "quadratic":
        phi = q_phase @ k_phase.transpose(-1, -2) / math.sqrt(phase_dim)
    else:  # linear: the paper's ablation, phi = (sum q_P + sum k_P) / sqrt(P)
        phi = (q_phase.sum(-1)[..., :, None] + k_phase.sum(-1)[..., None, :]) / math.sqrt(phase_dim)
    dist = distance_power(q_pos, k_pos, alpha, q.dtype)[:, None]  # broadcast over heads
    return amplitude * torch.cos(2 * math.pi * dist * phi)


def tapa_attention_reference(q, k, v, *, alpha, amp_dim, phase, causal, q_pos, k_pos):
    """q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D); positions (B, S) int64. Returns (out (B, Sq, Hq, D), lse (B, Hq, Sq))."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = tapa_scores(qh, kh, q_pos, k_pos, alpha=alpha, amp_dim=amp_dim, phase=phase)
    if causal:
        visible = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]  # (B, 1, Sq, Sk)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A row with no visible key has lse = -inf; its probabilities are 0, not NaN.
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - finite_lse[..., None])
    out = (probs @ vh).transpose(1, 2)
    return out, lse
