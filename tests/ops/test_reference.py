"""The oracle itself: its formula on a hand-worked case, and its gradient by finite differences."""

import math

import pytest
import torch

from tapa_megatron.ops.reference import tapa_attention_reference
from tests.ops.cases import random_case


def test_scores_match_hand_computation():
    # One head, D = 2 (A = P = 1), three tokens at positions 0, 5, 9: softmax of the paper's score.
    q = torch.tensor([[1.0, 0.5], [-0.3, 2.0], [0.7, -1.2]], dtype=torch.float64)
    k = torch.tensor([[0.2, 1.5], [1.1, -0.4], [-0.6, 0.9]], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    pos = [0, 5, 9]
    alpha = 0.1
    expected = []
    for m in range(3):
        scores = []
        for n in range(m + 1):
            dist = abs(pos[m] - pos[n]) ** alpha if m != n else 0.0
            scores.append(q[m, 0] * k[n, 0] * math.cos(2 * math.pi * dist * q[m, 1] * k[n, 1]))
        weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
        expected.append((weights[:, None] * v[: m + 1]).sum(0))
    positions = torch.tensor([pos])
    out, _ = tapa_attention_reference(q[None, :, None], k[None, :, None], v[None, :, None], alpha=alpha, amp_dim=1,
                                      phase="quadratic", causal=True, q_pos=positions, k_pos=positions)
    torch.testing.assert_close(out[0, :, 0], torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_linear_phase_matches_hand_computation():
    q = torch.tensor([[0.4, 1.0, -0.5]], dtype=torch.float64)  # D = 3: A = 1, P = 2 (theta = 1/3)
    k = torch.tensor([[1.3, 0.2, 0.7], [-0.8, 0.1, -1.1]], dtype=torch.float64)
    v = torch.eye(2, 3, dtype=torch.float64)
    q_pos, k_pos = torch.tensor([[7]]), torch.tensor([[0, 3]])
    phi = [(q[0, 1:].sum() + k[n, 1:].sum()) / math.sqrt(2) for n in range(2)]
    scores = torch.stack([q[0, 0] * k[n, 0] * math.cos(2 * math.pi * (7 - k_pos[0, n].item()) ** 0.1 * phi[n])
                          for n in range(2)])
    out, lse = tapa_attention_reference(q[None, :, None], k[None, :, None], v[None, :, None], alpha=0.1, amp_dim=1,
                                        phase="linear", causal=True, q_pos=q_pos, k_pos=k_pos)
    torch.testing.assert_close(lse[0, 0], torch.logsumexp(scores, 0)[None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0, 0, 0], torch.softmax(scores, 0) @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("phase", ["quadratic", "linear"])
@pytest.mark.parametrize("positions", ["arange", "random"])
def test_gradcheck(phase, positions):
    q, k, v, q_pos, k_pos = random_case(0, batch=1, seq_q=6, seq_k=7, heads_q=2, heads_kv=1, head_dim=8,
                                         positions=positions, max_position=50)

    def fn(q, k, v):
        return tapa_attention_reference(q, k, v, alpha=0.1, amp_dim=4, phase=phase, causal=True,
                                        q_pos=q_pos, k_pos=k_pos)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))
