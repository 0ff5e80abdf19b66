"""Random TAPA inputs and comparisons shared by the op tests."""

import torch

from tapa_megatron.ops import amplitude_dim
from tapa_megatron.ops.reference import tapa_attention_reference


def random_case(seed, *, batch=2, seq_q=48, seq_k=48, heads_q=4, heads_kv=2, head_dim=64, dtype=torch.float64,
                positions="arange", max_position=10**6):
    """q, k, v with requires_grad and positions (B, S) int64 of the named kind."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    q = rand(batch, seq_q, heads_q, head_dim)
    k = rand(batch, seq_k, heads_kv, head_dim)
    v = rand(batch, seq_k, heads_kv, head_dim)
    if positions == "arange":
        q_pos = torch.arange(seq_q).expand(batch, seq_q)
        k_pos = torch.arange(seq_k).expand(batch, seq_k)
    elif positions == "offset":  # a shard deep inside a long sequence, queries after the keys' start
        start = max_position - seq_q - seq_k
        k_pos = (start + torch.arange(seq_k)).expand(batch, seq_k)
        q_pos = (start + seq_k - seq_q + torch.arange(seq_q)).expand(batch, seq_q)
    elif positions == "random":  # arbitrary, unsorted, repeated positions up to max_position
        q_pos = torch.randint(0, max_position, (batch, seq_q), generator=gen)
        k_pos = torch.randint(0, max_position, (batch, seq_k), generator=gen)
    else:
        raise ValueError(positions)
    return q, k, v, q_pos.contiguous(), k_pos.contiguous()


def reference_with_grads(q, k, v, q_pos, k_pos, d_out, *, alpha=0.1, theta=0.5, phase="quadratic", causal=True):
    """The oracle in float64: out, lse and (dq, dk, dv) for the loss sum(out * d_out)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = tapa_attention_reference(q64, k64, v64, alpha=alpha, amp_dim=amplitude_dim(q.shape[-1], theta),
                                        phase=phase, causal=causal, q_pos=q_pos, k_pos=k_pos)
    grads = torch.autograd.grad((out * d_out.double()).sum(), (q64, k64, v64))
    return out.detach(), lse.detach(), grads


def assert_close(actual, expected, atol, rtol, name):
    actual, expected = actual.detach().double(), expected.detach().double()
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (actual.sign() == expected.sign())
    actual = torch.where(both_inf, 0.0, actual)
    expected = torch.where(both_inf, 0.0, expected)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
