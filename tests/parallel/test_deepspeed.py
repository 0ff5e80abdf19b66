"""TAPA under DeepSpeed-Ulysses on real gloo process groups, with DeepSpeed's own DistributedAttention.

Two oracles: the single-process op on the full sequence for `DistributedAttention(TapaLocalAttention)`,
and DeepSpeed's all-to-all for ours (`parallel.comm`'s sequence_to_heads / heads_to_sequence, and the
a2a scheme of `context_parallel_attention`).
"""

import importlib.util
import itertools
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks

SEQ = 24  # over 2 or 4 ranks: chunks of 12 or 6 tokens

# (batch_dim_idx, heads_q, heads_kv, phase, options, document lengths (None: batch of 2), positions given per rank:
# None (DeepSpeed's layout alone), "offset" (S,) continuing at 1000, "per-sample" (B, S))
CASES = [
    (0, 8, 4, "quadratic", {}, None, None),
    (1, 8, 4, "linear", {}, None, None),
    (0, 4, 4, "quadratic", dict(alpha=0.3, theta=0.25), None, "per-sample"),
    (1, 8, 8, "linear", dict(causal=False), None, "offset"),
    (0, 8, 4, "quadratic", {}, [5, 9, 10], None),  # documents straddle the ranks' chunks
    (1, 8, 4, "linear", {}, [7, 17], "offset"),
]


def _require_deepspeed():
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail("DeepSpeed is not installed: bash scripts/setup.sh installs the [deepspeed] extra.")


def _init_deepspeed():
    """DeepSpeed's communication backend over the gloo group tests.distributed started."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return dist.new_group(list(range(dist.get_world_size())))


def _inputs(seed, heads_q, heads_kv, batch, head_dim=32):
    gen = torch.Generator().manual_seed(seed)  # the same inputs on every rank
    q = torch.randn(batch, SEQ, heads_q, head_dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, SEQ, heads_kv, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    d_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    return q, k, v, d_out


def _mismatches(names, actual, expected, tolerance, label):
    errors = []
    for name, a, e in zip(names, actual, expected):
        diff = (a - e).abs().max().item()
        if not diff <= tolerance * max(1.0, e.abs().max().item()):
            errors.append(f"{label}: {name} differs by {diff:.2e}")
    return errors


def _deepspeed_vs_single_process(rank, world_size):
    from deepspeed.sequence.layer import DistributedAttention

    from tapa_megatron.ops import tapa_attention, tapa_attention_varlen
    from tapa_megatron.parallel.deepspeed import TapaLocalAttention, distributed_tapa_attention

    group = _init_deepspeed()
    chunk = slice(rank * SEQ // world_size, (rank + 1) * SEQ // world_size)  # DeepSpeed's layout
    errors = []
    for index, (batch_dim_idx, heads_q, heads_kv, phase, extra, documents, positions) in enumerate(CASES):
        options = dict(phase=phase, backend="torch", **extra)
        q, k, v, d_out = _inputs(index, heads_q, heads_kv, batch=1 if documents else 2)
        full_pos = {None: None, "offset": torch.arange(SEQ) + 1000,
                    "per-sample": torch.stack([torch.arange(SEQ) + 1000, torch.arange(SEQ) + 5])}[positions]
        qkv = [t.requires_grad_() for t in (q, k, v)]
        if documents:
            cu = torch.tensor([0, *itertools.accumulate(documents)], dtype=torch.int32)
            full = tapa_attention_varlen(q[0], k[0], v[0], cu, cu, max(documents), max(documents), q_pos=full_pos,
                                         k_pos=full_pos, **options)[None]
        else:
            cu = None
            full = tapa_attention(q, k, v, q_pos=full_pos, k_pos=full_pos, **options)
        expected = [full, *torch.autograd.grad((full * d_out).sum(), qkv)]

        def shard(x):  # this rank's chunk, in the layout DeepSpeed is called with
            x = x.detach()[:, chunk]
            return x.transpose(0, 1) if batch_dim_idx == 1 else x

        local = [shard(t).requires_grad_() for t in qkv]
        if index % 3 == 2:  # the helper; otherwise DeepSpeed's own class, with its defaults where they fit
            attn = distributed_tapa_attention(group, batch_dim_idx, **options)
        elif batch_dim_idx == 1:
            attn = DistributedAttention(TapaLocalAttention(1, group, **options), group)
        else:
            attn = DistributedAttention(TapaLocalAttention(0, group, **options), group, scatter_idx=2, gather_idx=1)
        kwargs = {} if full_pos is None else dict(position_ids=full_pos[..., chunk])
        out = attn(*local, batch_dim_idx, cu_seqlens=cu, **kwargs)
        grads = torch.autograd.grad((out * shard(d_out)).sum(), local)
        errors += _mismatches(("out", "dq", "dk", "dv"), (out, *grads), [shard(t) for t in expected], 1e-10,
                              f"case {index} (SP={world_size})")
    return errors


@pytest.mark.parametrize("sp_size", [2, 4])
def test_deepspeed_distributed_attention_matches_the_single_process_op(sp_size):
    _require_deepspeed()
    assert run_ranks(sp_size, _deepspeed_vs_single_process) == [[]] * sp_size


def _causal_softmax(q, k, v):
    """Plain causal softmax attention, (B, S, H, D), grouped-query heads."""
    group_size = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group_size, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    seq = q.shape[1]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


class _SoftmaxLocalAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return _causal_softmax(q, k, v)


def _our_a2a_vs_deepspeed(rank, world_size):
    from deepspeed.sequence.layer import DistributedAttention

    from tapa_megatron.parallel import context_parallel_attention
    from tapa_megatron.parallel.comm import heads_to_sequence, sequence_to_heads
    from tapa_megatron.parallel.deepspeed import TapaLocalAttention

    group = _init_deepspeed()
    chunk = slice(rank * SEQ // world_size, (rank + 1) * SEQ // world_size)
    names = ("out", "dq", "dk", "dv")
    errors = []

    # Plain causal softmax: our exchange functions against DeepSpeed's, the same local attention inside.
    for index, (heads_q, heads_kv) in enumerate([(8, 4), (4, 4)]):
        q, k, v, d_out = _inputs(100 + index, heads_q, heads_kv, batch=2)
        qkv = [t.requires_grad_() for t in (q, k, v)]
        full = _causal_softmax(*qkv)
        single = [full, *torch.autograd.grad((full * d_out).sum(), qkv)]
        results = {}
        for scheme in ("ours", "deepspeed"):
            local = [t.detach()[:, chunk].requires_grad_() for t in qkv]
            if scheme == "ours":
                out = heads_to_sequence(_causal_softmax(*(sequence_to_heads(t, group) for t in local)), group)
            else:
                out = DistributedAttention(_SoftmaxLocalAttention(), group, scatter_idx=2, gather_idx=1)(*local, 0)
            results[scheme] = [out, *torch.autograd.grad((out * d_out[:, chunk]).sum(), local)]
        label = f"softmax hq{heads_q} hkv{heads_kv} (SP={world_size})"
        errors += _mismatches(names, results["ours"], results["deepspeed"], 1e-12, f"{label}, ours vs DeepSpeed")
        errors += _mismatches(names, results["deepspeed"], [t[:, chunk] for t in single], 1e-10,
                              f"{label}, DeepSpeed vs single process")

    # TAPA: our a2a scheme against DeepSpeed around TapaLocalAttention, positions given explicitly (DeepSpeed's
    # contiguous chunks, not our zigzag). With fewer kv heads than ranks ours repeats them; a DeepSpeed user
    # repeats them before the call (DeepSpeed needs heads_kv divisible by the group size).
    for index, (heads_q, heads_kv, phase) in enumerate([(8, 4, "quadratic"), (8, 1, "linear")]):
        options = dict(phase=phase, backend="torch")
        q, k, v, d_out = _inputs(200 + index, heads_q, heads_kv, batch=2)
        positions = (torch.arange(SEQ) + 7)[chunk]
        results = {}
        for scheme in ("ours", "deepspeed"):
            local = [t[:, chunk].clone().requires_grad_() for t in (q, k, v)]
            if scheme == "ours":
                out = context_parallel_attention(*local, cp_group=group, comm="a2a", q_pos=positions,
                                                 k_pos=positions, **options)
            else:
                repeat = max(1, world_size // heads_kv)
                k_rep, v_rep = (t.repeat_interleave(repeat, dim=2) for t in local[1:])
                attn = DistributedAttention(TapaLocalAttention(0, group, **options), group, scatter_idx=2, gather_idx=1)
                out = attn(local[0], k_rep, v_rep, 0, position_ids=positions)
            results[scheme] = [out, *torch.autograd.grad((out * d_out[:, chunk]).sum(), local)]
        errors += _mismatches(names, results["ours"], results["deepspeed"], 1e-12,
                              f"TAPA {phase} hq{heads_q} hkv{heads_kv} (SP={world_size}), ours vs DeepSpeed")
    return errors


@pytest.mark.parametrize("sp_size", [2, 4])
def test_our_all_to_all_matches_deepspeed(sp_size):
    _require_deepspeed()
    assert run_ranks(sp_size, _our_a2a_vs_deepspeed) == [[]] * sp_size


def _errors(rank, world_size):
    from tapa_megatron.parallel.deepspeed import TapaLocalAttention

    group = dist.new_group(list(range(world_size)))
    one, two = torch.randn(1, 8, 2, 32), torch.randn(2, 8, 2, 32)  # as after the exchange: all 8 tokens
    messages = []
    for make, x, kwargs in [
        (lambda: TapaLocalAttention(2), one, {}),
        (lambda: TapaLocalAttention(0, phase="cubic"), one, {}),
        (lambda: TapaLocalAttention(0), one, dict(position_ids=torch.arange(4))),
        (lambda: TapaLocalAttention(0, group), one, dict(position_ids=torch.arange(8))),
        (lambda: TapaLocalAttention(0, group), two, dict(cu_seqlens=torch.tensor([0, 8]))),
    ]:
        try:
            make()(x, x, x, **kwargs)
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_clear_errors():
    messages = run_ranks(2, _errors)[0]
    assert len(messages) == 5
    assert "batch_dim_idx=2: use 0 for (batch, seq, heads, head_dim)" in messages[0]
    assert "phase='cubic' is unknown" in messages[1]
    assert "give TapaLocalAttention the sequence_process_group" in messages[2]
    assert "position_ids has shape (8,); expected this rank's (4,) or (1, 4)" in messages[3]
    assert "cu_seqlens (packed documents) needs batch 1, got batch 2" in messages[4]


def test_importing_the_module_does_not_import_deepspeed():
    code = "import sys, tapa_megatron.parallel.deepspeed; assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
