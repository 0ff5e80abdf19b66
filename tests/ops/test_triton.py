"""The fused Triton kernels against the float64 oracle.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which computes in exact fp32 and uses tl.cos / tl.sin instead of the GPU's approximate PTX
cosine; on a CUDA machine the same tests run the compiled kernels.
"""

import random

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from tapa_kernels import tapa_fwd
from tapa_kernels.tapa_fwd import contiguous_documents
from tapa_kernels.tapa_score import diagonal_distance_power, distance_power
from tapa_megatron.ops import amplitude_dim, tapa_attention, tapa_attention_varlen
from tapa_megatron.ops.reference import tapa_attention_reference
from tapa_megatron.ops.triton import tapa_attention_triton, tapa_attention_varlen_triton
from tests.ops.cases import assert_close, random_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAR = 10**6


@pytest.fixture
def bf16_dots_in_interpreter(monkeypatch):
    """Triton's interpreter (3.9) keeps bf16 as uint16 bit patterns and hands them to np.matmul as
    integers in tl.dot. Decode them to fp32 first (exact) so bf16 inputs can be tested on CPU."""
    if DEVICE == "cuda":
        return
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def as_fp32(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot_bf16(self, a, b, d, *args):
        return create_dot(self, as_fp32(a), as_fp32(b), d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot_bf16)


def make_case(seed, *, positions, dtype=torch.float32, **shape):
    """random_case plus the layouts of long-context training: 'far' (queries 10^6 positions after
    the keys, every tile on the distance series) and 'zigzag' (the two chunks a context-parallel
    rank holds, 0.. and ..10^6)."""
    base = "arange" if positions in ("far", "zigzag") else positions
    q, k, v, q_pos, k_pos = random_case(seed, dtype=dtype, positions=base, **shape)
    if positions == "far":
        q_pos = q_pos + FAR
    elif positions == "zigzag":
        q_pos, k_pos = (torch.where(p < p.shape[1] // 2, p, p + FAR - p.shape[1]) for p in (q_pos, k_pos))
    q, k, v = (t.detach().to(DEVICE).requires_grad_() for t in (q, k, v))
    return q, k, v, q_pos.to(DEVICE), k_pos.to(DEVICE)


def losses_and_grads(out, lse, d_out, d_lse, inputs):
    """Gradients of sum(out * d_out) + sum(lse * d_lse) over the rows that see a key: the lse term
    checks the kernels' dlse path (lse feeds merges of partial attentions)."""
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    loss = (out * d_out.to(out.dtype)).sum() + (finite_lse * d_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, inputs)


def run_both(q, k, v, q_pos, k_pos, *, theta, phase, causal, alpha=0.1, seed=0):
    """(out, lse, grads) from the Triton path and from the oracle in float64 on the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    d_lse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen, dtype=torch.float64).to(DEVICE)
    options = dict(alpha=alpha, amp_dim=amplitude_dim(q.shape[-1], theta), phase=phase, causal=causal)
    out, lse = tapa_attention_triton(q, k, v, q_pos=q_pos, k_pos=k_pos, **options)
    grads = losses_and_grads(out, lse, d_out, d_lse, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = tapa_attention_reference(q64, k64, v64, q_pos=q_pos, k_pos=k_pos, **options)
    ref_grads = losses_and_grads(ref_out, ref_lse, d_out, d_lse, (q64, k64, v64))
    return (out, lse, grads), (ref_out, ref_lse, ref_grads)


def assert_matches(result, reference, atol, rtol, grad_tol):
    """Gradients are compared relative to their largest entry: the phase scales the amplitude
    gradient by 2 pi |m - n|^alpha, and with it the (inherent) fp32 rounding error."""
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = result, reference
    assert_close(out, ref_out, atol, rtol, "out")
    assert_close(lse, ref_lse, atol, rtol, "lse")
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(grad).all(), name
        assert_close(grad, ref, grad_tol * max(1.0, ref.abs().max().item()), grad_tol, name)


def sweep(n, seed=2024):
    """A seeded sweep over the shapes and options the kernels promise to handle."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        heads_kv = rng.choice([1, 2, 4])
        cases.append(dict(
            seed=i,
            batch=rng.choice([1, 2]),
            seq_q=rng.choice([1, 29, 64, 100]),
            seq_k=rng.choice([1, 40, 64, 100]),
            heads_kv=heads_kv,
            heads_q=heads_kv * rng.choice([1, 2, 4]),
            head_dim=rng.choice([64, 128]),
            theta=rng.choice([0.25, 0.5, 0.75]),
            phase=rng.choice(["quadratic", "linear"]),
            causal=rng.choice([True, False]),
            positions=rng.choice(["arange", "offset", "random", "far", "zigzag"]),
        ))
    return cases


@pytest.mark.parametrize("case", sweep(36), ids=lambda c: "-".join(f"{v}" for k, v in c.items() if k != "seed"))
def test_matches_reference_fp32(case):
    case = dict(case)
    theta, phase, causal = (case.pop(key) for key in ("theta", "phase", "causal"))
    q, k, v, q_pos, k_pos = make_case(**case)
    result, reference = run_both(q, k, v, q_pos, k_pos, theta=theta, phase=phase, causal=causal, seed=case["seed"])
    assert result[0].dtype == torch.float32 and result[1].dtype == torch.float32
    assert result[1].shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_matches(result, reference, atol=2e-4, rtol=2e-4, grad_tol=2e-3)


@pytest.mark.parametrize("dtype,head_dim,theta,phase,causal,positions", [
    (torch.bfloat16, 64, 0.5, "quadratic", True, "far"),
    (torch.bfloat16, 128, 0.75, "linear", False, "zigzag"),
    (torch.float16, 64, 0.25, "quadratic", True, "random"),
])
def test_half_precision_inputs(dtype, head_dim, theta, phase, causal, positions, bf16_dots_in_interpreter):
    """Against the oracle on the same bf16 / fp16 values in float64; the kernels round probabilities
    and score gradients to the input dtype for the tensor-core products, as flash attention does."""
    q, k, v, q_pos, k_pos = make_case(7, batch=1, seq_q=80, seq_k=96, heads_q=4, heads_kv=2, head_dim=head_dim,
                                      dtype=dtype, positions=positions)
    result, reference = run_both(q, k, v, q_pos, k_pos, theta=theta, phase=phase, causal=causal)
    assert result[0].dtype == dtype and result[1].dtype == torch.float32
    assert all(grad.dtype == dtype for grad in result[2])
    assert_matches(result, reference, atol=2e-2, rtol=2e-2, grad_tol=6e-2)


def test_larger_alpha_at_large_distances():
    """alpha = 0.5 makes the phase (and its fp32 error) grow fast with distance: keep distances
    moderate (~5000)."""
    q, k, v, q_pos, k_pos = make_case(11, batch=1, seq_q=64, seq_k=64, heads_q=2, heads_kv=1, positions="arange")
    q_pos = q_pos + 5000
    result, reference = run_both(q, k, v, q_pos, k_pos, theta=0.5, phase="quadratic", causal=True, alpha=0.5)
    assert_matches(result, reference, atol=2e-4, rtol=2e-4, grad_tol=2e-3)


def test_varlen_documents_match_the_reference_one_by_one():
    """Unequal documents, seq_q != seq_k inside documents, a one-token document, documents without
    keys or without queries, in one packed call with GQA; each document is checked against the
    oracle alone."""
    gen = torch.Generator().manual_seed(5)
    lens_q, lens_k = [37, 1, 70, 20, 3, 0], [37, 1, 64, 45, 0, 9]
    heads_q, heads_kv, head_dim, theta, phase = 4, 2, 64, 0.75, "quadratic"
    q = torch.randn(sum(lens_q), heads_q, head_dim, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(sum(lens_k), heads_kv, head_dim, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(sum(lens_k), heads_kv, head_dim, generator=gen).to(DEVICE).requires_grad_()
    # Positions: from 0; around 10^6 with the first 6 queries before every key; queries 2 * 10^6
    # past their keys (the distance series).
    starts_q, starts_k = [0, 7, FAR - 6, 2 * FAR, 0, 0], [0, 7, FAR, 0, 0, 0]
    q_pos = torch.cat([s + torch.arange(n) for s, n in zip(starts_q, lens_q)]).to(DEVICE)
    k_pos = torch.cat([s + torch.arange(n) for s, n in zip(starts_k, lens_k)]).to(DEVICE)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    options = dict(alpha=0.1, amp_dim=amplitude_dim(head_dim, theta), phase=phase, causal=True)
    out, lse = tapa_attention_varlen_triton(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), q_pos=q_pos, k_pos=k_pos,
                                            **options)
    assert out.shape == q.shape and lse.shape == (heads_q, q.shape[0])
    d_out = torch.randn(q.shape, generator=gen).to(DEVICE)
    d_lse = torch.randn(lse.shape, generator=gen).to(DEVICE)
    dq, dk, dv = losses_and_grads(out, lse, d_out, d_lse, (q, k, v))

    for (q0, q1), (k0, k1) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
        if k0 == k1 or q0 == q1:  # nothing to see, or nobody looking
            assert (out[q0:q1] == 0).all() and torch.isneginf(lse[:, q0:q1]).all()
            assert (dq[q0:q1] == 0).all() and (dk[k0:k1] == 0).all() and (dv[k0:k1] == 0).all()
            continue
        q64, k64, v64 = (t[None, a:b].detach().double().requires_grad_()
                         for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        ref_out, ref_lse = tapa_attention_reference(q64, k64, v64, q_pos=q_pos[None, q0:q1], k_pos=k_pos[None, k0:k1],
                                                    **options)
        ref_grads = losses_and_grads(ref_out, ref_lse, d_out[None, q0:q1], d_lse[None, :, q0:q1], (q64, k64, v64))
        assert_close(out[q0:q1], ref_out[0], 2e-4, 2e-4, f"out doc {q0}")
        assert_close(lse[:, q0:q1], ref_lse[0], 2e-4, 2e-4, f"lse doc {q0}")
        for name, grad, ref in zip(("dq", "dk", "dv"), (dq[q0:q1], dk[k0:k1], dv[k0:k1]), ref_grads):
            assert_close(grad, ref[0], 2e-3, 2e-3, f"{name} doc {q0}")


@pytest.mark.parametrize("phase", ["quadratic", "linear"])
def test_rows_without_visible_keys_give_zero_and_minus_inf(phase):
    """Queries before every key (causal): out 0, lse -inf, zero and finite gradients; the other rows
    still match the oracle."""
    q, k, v, q_pos, k_pos = make_case(3, batch=2, seq_q=40, seq_k=40, heads_q=2, heads_kv=1, positions="arange")
    k_pos = k_pos + 10  # queries 0..9 see nothing
    result, reference = run_both(q, k, v, q_pos, k_pos, theta=0.5, phase=phase, causal=True)
    out, lse, (dq, dk, dv) = result
    assert (out[:, :10] == 0).all() and torch.isneginf(lse[:, :, :10]).all()
    assert torch.isfinite(lse[:, :, 10:]).all()
    assert (dq[:, :10] == 0).all()
    assert_matches(result, reference, atol=2e-4, rtol=2e-4, grad_tol=2e-3)


def test_strided_inputs_give_the_same_result():
    """Non-contiguous views (a head-major buffer, an interleaved head dim) are read through their strides."""
    gen = torch.Generator().manual_seed(9)
    total, heads_q, heads_kv, head_dim = 50, 4, 2, 64
    q = torch.randn(heads_q, total, head_dim, generator=gen).to(DEVICE).transpose(0, 1)
    k = torch.randn(total, heads_kv, head_dim, 2, generator=gen).to(DEVICE)[..., 0]
    v = torch.randn(total, heads_kv, 2 * head_dim, generator=gen).to(DEVICE)[..., head_dim:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cu = torch.tensor([0, 20, total], dtype=torch.int32, device=DEVICE)
    pos = torch.cat([torch.arange(20), torch.arange(30)]).to(DEVICE)
    options = dict(alpha=0.1, amp_dim=32, phase="quadratic", causal=True)
    strided = tapa_fwd(q, k, v, cu, cu, 30, 30, pos, pos, **options)
    dense = tapa_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 30, 30, pos, pos, **options)
    for a, b in zip(strided, dense):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,head_dim,amp_dim,message", [
    (torch.float64, 64, 32, "fp16, bf16 or fp32"),
    (torch.float32, 96, 48, "head_dim 64 or 128"),
    (torch.float32, 64, 40, "multiples of 16"),
])
def test_launcher_refuses_what_the_kernels_cannot_do(dtype, head_dim, amp_dim, message):
    q = torch.zeros(4, 2, head_dim, dtype=dtype, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        tapa_fwd(q, q, q, cu, cu, 4, 4, pos, pos, alpha=0.1, amp_dim=amp_dim, phase="quadratic", causal=True)


@triton.jit
def _distance_power_kernel(row_ptr, col_ptr, out_ptr, alpha, log2_scale, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows, cols = tl.arange(0, ROWS), tl.arange(0, COLS)
    dist = distance_power(tl.load(row_ptr + rows), tl.load(col_ptr + cols), alpha, log2_scale, FAST_MATH=False)
    tl.store(out_ptr + rows[:, None] * COLS + cols[None, :], dist)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.5])
def test_distance_power_matches_exact_power(alpha):
    """distance_power on tiles far off the diagonal (on either side, strided), near it, on it and
    unsorted: within 4e-6 relative of |m - n|^alpha / sqrt(32) in float64 (the fp32 rounding of
    alpha log2 d at d ~ 1e6; the scale rides in the exponent as the kernels' 1/sqrt(P)), exactly 0
    on the diagonal."""
    gen = torch.Generator().manual_seed(0)
    base = torch.arange(32)

    def jitter():
        return torch.randint(0, 64, (32,), generator=gen)

    tiles = [
        (FAR + base, base),  # rows far after cols
        (base + 3000, FAR + 2 * base),  # rows far before cols, strided
        (FAR + jitter(), FAR - 200 - jitter()),  # off the diagonal, near it
        (FAR + base, FAR + base),  # the diagonal
        (FAR + base, torch.randint(0, 2 * FAR, (32,), generator=gen)),  # unsorted, both sides
    ]
    for rows, cols in tiles:
        out = torch.empty(32, 32, device=DEVICE)
        _distance_power_kernel[(1,)](rows.to(DEVICE), cols.to(DEVICE), out, alpha, -2.5, ROWS=32, COLS=32)
        exact = (rows[:, None] - cols[None, :]).abs().double() ** alpha / 32**0.5
        torch.testing.assert_close(out.cpu().double(), exact, atol=0, rtol=4e-6)


@triton.jit
def _diagonal_distance_power_kernel(row_ptr, col_ptr, out_ptr, alpha, log2_scale, ROWS: tl.constexpr,
                                    COLS: tl.constexpr):
    rows, cols = tl.arange(0, ROWS), tl.arange(0, COLS)
    dist = diagonal_distance_power(tl.load(row_ptr + rows), tl.load(col_ptr + cols), alpha, log2_scale,
                                   FAST_MATH=False)
    tl.store(out_ptr + rows[:, None] * COLS + cols[None, :], dist)


@pytest.mark.parametrize("rows,cols", [(32, 16), (16, 32), (32, 32)])
def test_diagonal_distance_power_matches_exact_power(rows, cols):
    """The once-per-diagonal power on contiguous tiles far after, far before, across and near the
    diagonal: as distance_power's tolerance against |m - n|^alpha / sqrt(32) in float64, exactly 0 on it."""
    for row_start, col_start in [(FAR, 0), (3000, FAR), (FAR, FAR), (FAR + 5, FAR), (FAR, FAR + 20)]:
        row_pos, col_pos = row_start + torch.arange(rows), col_start + torch.arange(cols)
        out = torch.empty(rows, cols, device=DEVICE)
        _diagonal_distance_power_kernel[(1,)](row_pos.to(DEVICE), col_pos.to(DEVICE), out, 0.5, -2.5,
                                              ROWS=rows, COLS=cols)
        exact = (row_pos[:, None] - col_pos[None, :]).abs().double() ** 0.5 / 32**0.5
        torch.testing.assert_close(out.cpu().double(), exact, atol=0, rtol=4e-6)


def test_contiguous_documents_flags_documents_whose_positions_count_up_by_one():
    """Against a per-document loop: empty and one-token documents count as contiguous, an offset
    start is fine, a repeated or skipped position on either side is not."""
    lengths = [0, 1, 5, 7, 0, 3, 9, 2]
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    q_pos = torch.cat([100 * i + torch.arange(n) for i, n in enumerate(lengths)])
    k_pos = q_pos.clone()
    q_pos[cu[3] + 2] += 1  # document 3: a skipped position
    k_pos[cu[5] + 1] -= 1  # document 5: a repeated one
    k_pos[cu[6]:cu[7]] = k_pos[cu[6]:cu[7]].flip(0)  # document 6: counting down
    flags = contiguous_documents(cu, cu, q_pos, k_pos)

    def counts_up(pos):
        return all(int(b) - int(a) == 1 for a, b in zip(pos[:-1], pos[1:]))

    expected = [counts_up(q_pos[cu[i]:cu[i + 1]]) and counts_up(k_pos[cu[i]:cu[i + 1]]) for i in range(len(lengths))]
    assert flags.tolist() == [int(e) for e in expected]
    assert expected.count(False) == 3


def test_public_api_dispatches_to_the_kernels():
    """tapa_attention / tapa_attention_varlen with backend='triton' agree with backend='reference'
    (with lse unused by the loss: the backward without a dlse term)."""
    q, k, v, q_pos, k_pos = make_case(13, batch=2, seq_q=24, seq_k=24, heads_q=4, heads_kv=1, positions="arange")
    options = dict(alpha=0.1, theta=0.5, phase="quadratic", causal=True, return_lse=True)
    out, lse = tapa_attention(q, k, v, backend="triton", **options)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = tapa_attention(q64, k64, v64, backend="reference", **options)
    assert_close(out, ref_out, 2e-4, 2e-4, "out")
    assert_close(lse, ref_lse, 2e-4, 2e-4, "lse")
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref_out.pow(2).sum(), (q64, k64, v64))
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(grad, ref, 2e-3, 2e-3, name)

    cu = torch.tensor([0, 24, 48], dtype=torch.int32, device=DEVICE)
    packed = [t.reshape(48, *t.shape[2:]) for t in (q, k, v)]
    out, lse = tapa_attention_varlen(*packed, cu, cu, 24, 24, backend="triton", **options)
    ref_out, ref_lse = tapa_attention_varlen(*(t.double() for t in packed), cu, cu, 24, 24, backend="reference",
                                             **options)
    assert_close(out, ref_out, 2e-4, 2e-4, "varlen out")
    assert_close(lse, ref_lse, 2e-4, 2e-4, "varlen lse")
