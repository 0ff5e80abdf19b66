"""Context-parallel attention on real gloo process groups against the single-process op: TAPA's, and
for the baselines' softmax score PyTorch's own scaled_dot_product_attention."""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import run_ranks

CASES = [  # (comm, dtype, heads_q, heads_kv, phase, packed, seq or document lengths in units of 2*CP)
    *[(comm, torch.float64, 4, 2, "quadratic", False, [3]) for comm in ("p2p", "all_gather", "a2a")],
    *[(comm, torch.float32, 4, 4, "linear", False, [2]) for comm in ("p2p", "all_gather", "a2a")],
    *[(comm, torch.float64, 4, 1, "quadratic", True, [1, 3, 2]) for comm in ("p2p", "all_gather", "a2a")],
    ("p2p", torch.float64, 8, 2, "linear", False, [1]),  # one token per chunk: the edge of the layout rule
    ("a2a", torch.float64, 8, 2, "quadratic", True, [1, 1]),
]
# The baselines' plain softmax score ("phase" None): the same schemes, layouts and GQA shapes.
SOFTMAX_CASES = [
    *[(comm, torch.float64, 4, 2, None, False, [3]) for comm in ("p2p", "all_gather", "a2a")],
    *[(comm, torch.float64, 4, 1, None, True, [1, 3, 2]) for comm in ("p2p", "all_gather", "a2a")],
    ("p2p", torch.float32, 4, 4, None, False, [2]),
]


def _sdpa(q, k, v):
    """PyTorch's causal attention on (B, S, H, D) tensors: the oracle for the softmax score."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _single_process(q, k, v, cu, lengths, phase):
    """The unsharded result: TAPA's op, or (phase None) SDPA one document at a time."""
    from tapa_megatron.ops import tapa_attention, tapa_attention_varlen

    if phase is None:
        if cu is None:
            return _sdpa(q, k, v)
        bounds = cu.tolist()
        return torch.cat([_sdpa(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(bounds, bounds[1:])])
    options = dict(alpha=0.1, theta=0.5, phase=phase, backend="torch")
    if cu is None:
        return tapa_attention(q, k, v, **options)
    return tapa_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), **options)


def _compare(rank, world_size, cases):
    from tapa_megatron.parallel import context_parallel_attention, layout

    group = dist.new_group(list(range(world_size)))
    errors = []
    for case_index, (comm, dtype, heads_q, heads_kv, phase, packed, units) in enumerate(cases):
        lengths = [u * 2 * world_size for u in units]
        total = sum(lengths)
        gen = torch.Generator().manual_seed(case_index)  # the same inputs on every rank
        shape = (total,) if packed else (2, total)
        q = torch.randn(*shape, heads_q, 64, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        k = torch.randn(*shape, heads_kv, 64, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        v = torch.randn(*shape, heads_kv, 64, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        d_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(dtype)
        if phase is None:
            options = dict(score="softmax")
        else:
            options = dict(alpha=0.1, theta=0.5, phase=phase, backend="torch")
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32) if packed else None
        full = _single_process(q, k, v, cu, lengths, phase)
        expected = torch.autograd.grad((full * d_out).sum(), (q, k, v))
        dim = 0 if packed else 1

        def shard(x):
            return layout.shard_sequence(x, lengths, world_size, rank, dim=dim)

        q_local, k_local, v_local = (shard(t.detach()).requires_grad_() for t in (q, k, v))
        out = context_parallel_attention(q_local, k_local, v_local, cp_group=group, comm=comm, cu_seqlens=cu,
                                         **options)
        grads = torch.autograd.grad((out * shard(d_out)).sum(), (q_local, k_local, v_local))
        tolerance = 1e-10 if dtype == torch.float64 else 2e-4
        for name, actual, reference in zip(("out", "dq", "dk", "dv"), (out, *grads), (full, *expected)):
            diff = (actual.double() - shard(reference).double()).abs().max().item()
            if not diff <= tolerance * max(1.0, shard(reference).abs().max().item()):
                errors.append(f"{comm} {dtype} hq{heads_q} hkv{heads_kv} {phase} packed={packed} {units}: {name} {diff:.2e}")
    return errors


@pytest.mark.parametrize("cp_size", [2, 4])
def test_every_scheme_matches_the_single_process_op(cp_size):
    errors = run_ranks(cp_size, _compare, CASES)
    assert errors == [[]] * cp_size


@pytest.mark.parametrize("cp_size", [2, 4])
def test_every_scheme_matches_sdpa_with_the_softmax_score(cp_size):
    errors = run_ranks(cp_size, _compare, SOFTMAX_CASES)
    assert errors == [[]] * cp_size


def _explicit_positions(rank, world_size):
    """Shards given by explicit global positions (no layout): contiguous halves of a sequence at an offset."""
    from tapa_megatron.ops import tapa_attention
    from tapa_megatron.parallel import context_parallel_attention

    group = dist.new_group(list(range(world_size)))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    positions = torch.arange(24) + 500_000
    full = tapa_attention(q, k, v, q_pos=positions, k_pos=positions, backend="torch")
    mine = slice(rank * 12, (rank + 1) * 12)
    out = context_parallel_attention(q[:, mine], k[:, mine], v[:, mine], cp_group=group, comm="p2p",
                                     q_pos=positions[mine], k_pos=positions[mine], backend="torch")
    return (out - full[:, mine]).abs().max().item()


def test_ring_with_explicit_positions():
    assert max(run_ranks(2, _explicit_positions)) < 1e-12


def _errors(rank, world_size):
    from tapa_megatron.parallel import context_parallel_attention

    group = dist.new_group(list(range(world_size)))
    messages = []
    for kwargs in (dict(q=torch.randn(1, 3, 4, 64)), dict(q=torch.randn(1, 4, 3, 64), comm="a2a"),
                   dict(q=torch.randn(1, 4, 4, 64), comm="ring"), dict(q=torch.randn(1, 4, 4, 64), score="alibi")):
        q = kwargs.pop("q")
        k = torch.randn(*q.shape[:2], 1, 64)
        try:
            context_parallel_attention(q, k, k, cp_group=group, backend="torch", **kwargs)
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_clear_errors():
    messages = run_ranks(2, _errors)[0]
    assert "sequence length 6 is not a multiple of 2 x context-parallel size = 4" in messages[0]
    assert "3 query heads are not divisible by the context-parallel size 2" in messages[1]
    assert "comm='ring' is unknown" in messages[2]
    assert "score='alibi' is unknown; use one of ('tapa', 'softmax')" in messages[3]
