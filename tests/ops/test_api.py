"""The public API: dispatch, positions, the packed (varlen) layout and input validation."""

import pytest
import torch

from tapa_megatron.ops import tapa_attention, tapa_attention_varlen
from tests.ops.cases import assert_close, random_case


def test_default_positions_are_arange_and_both_position_shapes_agree():
    q, k, v, _, _ = random_case(0, seq_q=20, seq_k=20)
    default = tapa_attention(q, k, v, backend="torch")
    flat = tapa_attention(q, k, v, q_pos=torch.arange(20), k_pos=torch.arange(20), backend="torch")
    batched = tapa_attention(q, k, v, q_pos=torch.arange(20).expand(2, 20), k_pos=torch.arange(20).expand(2, 20),
                             backend="torch")
    assert torch.equal(default, flat) and torch.equal(default, batched)


def test_scores_depend_on_positions_not_indices():
    """Shifting every position by the same offset leaves the output unchanged (only |m - n| matters),
    while a different spacing changes it."""
    q, k, v, _, _ = random_case(1, seq_q=16, seq_k=16)
    pos = torch.arange(16)
    base = tapa_attention(q, k, v, q_pos=pos, k_pos=pos, backend="torch")
    shifted = tapa_attention(q, k, v, q_pos=pos + 123_456, k_pos=pos + 123_456, backend="torch")
    spread = tapa_attention(q, k, v, q_pos=pos * 3, k_pos=pos * 3, backend="torch")
    assert_close(shifted, base, 1e-9, 1e-9, "shifted")
    assert (spread - base).abs().max() > 1e-3


def test_auto_backend_on_cpu_is_the_torch_path():
    q, k, v, _, _ = random_case(2, seq_q=12, seq_k=12)
    assert torch.equal(tapa_attention(q, k, v), tapa_attention(q, k, v, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_documents_are_independent(backend, causal):
    lengths_q, lengths_k = [5, 1, 30, 12], [5, 3, 30, 20]
    cu_q = torch.tensor([0, 5, 6, 36, 48], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 8, 38, 58], dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(48, 4, 64, generator=gen, dtype=torch.float64)
    k = torch.randn(58, 2, 64, generator=gen, dtype=torch.float64)
    v = torch.randn(58, 2, 64, generator=gen, dtype=torch.float64)
    out, lse = tapa_attention_varlen(q, k, v, cu_q, cu_k, 30, 30, causal=causal, return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (4, 48)
    for i in range(4):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        doc_out, doc_lse = tapa_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal,
                                          return_lse=True, backend="reference")
        assert_close(out[q0:q1], doc_out[0], 1e-10, 1e-10, f"doc {i} out")
        assert_close(lse[:, q0:q1], doc_lse[0], 1e-10, 1e-10, f"doc {i} lse")


def test_varlen_explicit_positions_are_used():
    cu = torch.tensor([0, 10, 20], dtype=torch.int32)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(20, 2, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    pos = torch.cat([torch.arange(10) * 7, torch.arange(10) + 1000])
    out = tapa_attention_varlen(q, k, v, cu, cu, 10, 10, q_pos=pos, k_pos=pos, backend="torch")
    second = tapa_attention(q[None, 10:], k[None, 10:], v[None, 10:], q_pos=pos[10:], k_pos=pos[10:],
                            backend="reference")
    first = tapa_attention(q[None, :10], k[None, :10], v[None, :10], q_pos=pos[:10], k_pos=pos[:10],
                           backend="reference")
    assert_close(out, torch.cat([first[0], second[0]]), 1e-10, 1e-10, "out")


def qkv(batch=1, seq=8, heads_q=4, heads_kv=2, dim=64, **overrides):
    shapes = dict(q=(batch, seq, heads_q, dim), k=(batch, seq, heads_kv, dim), v=(batch, seq, heads_kv, dim))
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
    tensors.update(overrides)
    return tensors["q"], tensors["k"], tensors["v"]


@pytest.mark.parametrize("inputs,kwargs,message", [
    (qkv(), dict(theta=0.3), "is not an integer"),
    (qkv(), dict(theta=1.0), "strictly between 0 and 1"),
    (qkv(heads_q=3, heads_kv=2), {}, "not a multiple of heads_kv"),
    (qkv(), dict(alpha=0.0), "must be > 0"),
    (qkv(), dict(alpha=-0.1), "must be > 0"),
    (qkv(), dict(phase="cubic"), "phase='cubic' is unknown"),
    (qkv(), dict(backend="cuda"), "backend='cuda' is unknown"),
    (qkv(k=torch.randn(1, 8, 64)), {}, "expected 4 dims"),
    (qkv(v=torch.randn(1, 8, 2, 64, dtype=torch.float64)), {}, "dtypes differ"),
    (qkv(k=torch.randn(1, 8, 2, 32), v=torch.randn(1, 8, 2, 32)), {}, "head_dim"),
    (qkv(k=torch.randn(2, 8, 2, 64), v=torch.randn(2, 8, 2, 64)), {}, "batch"),
    (qkv(q=torch.ones(1, 8, 4, 64, dtype=torch.int64)), {}, "floating point"),
    (qkv(), dict(q_pos=torch.arange(9)), "q_pos has shape (9,)"),
    (qkv(), dict(k_pos=torch.arange(8.0)), "must be integer"),
    (qkv(), dict(backend="triton"), None),  # CPU without the interpreter: see the test below
])
def test_invalid_inputs_are_refused_with_a_clear_message(inputs, kwargs, message, monkeypatch):
    if message is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        message = "needs CUDA tensors"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tapa_attention(*inputs, **kwargs)


@pytest.mark.parametrize("cu_q,cu_k,max_q,message", [
    ([0, 5, 8], [0, 8], 8, "has 2 documents but"),
    ([1, 5, 8], [1, 5, 8], 8, "must start at 0"),
    ([0, 6, 5, 8], [0, 6, 5, 8], 8, "never decrease"),
    ([0, 5, 7], [0, 5, 7], 8, "end at the token count 8"),
    ([0, 5, 8], [0, 5, 8], 3, "smaller than the longest document"),
])
def test_invalid_varlen_inputs(cu_q, cu_k, max_q, message):
    q, k, v = (torch.randn(8, 2, 64) for _ in range(3))
    cu_q, cu_k = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        tapa_attention_varlen(q, k, v, cu_q, cu_k, max_q, 8)
