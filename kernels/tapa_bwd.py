"""TAPA attention backward: three kernels over packed (varlen) documents.

1. delta:  delta_i = sum(dO_i * O_i) - dlse_i, the softmax correction of each query row.
2. dK/dV:  one program per key tile of one (document, kv head); loops over the query heads of its
   group and over query tiles, accumulating dK and dV in registers (no atomics).
3. dQ:     one program per query tile of one (document, query head); loops over key tiles.

Both gradient kernels recompute the scores from q, k, the positions and lse. With
P = softmax probabilities and dS = P * (dO.V^T - delta), the score s = amp * cos(angle) gives

    d_amp = dS * cos(angle)        d_phi = -dS * amp * sin(angle) * 2 pi |m - n|^alpha

and the amplitude / phase parts of dQ, dK are products of these with the other side's parts.
Constant factors (1/sqrt(A), -2 pi ln 2) are applied once to the accumulated gradients at the
store, not per score.
"""

import torch
import triton
import triton.language as tl

from tapa_kernels.tapa_fwd import LN2, LOG2E, contiguous_documents, interpreting, kernel_options, kernel_scalars, mma_warps
from tapa_kernels.tapa_score import (
    TWO_PI,
    cos_radians,
    hidden_tile_end,
    is_visible,
    load_positions,
    load_rows,
    load_split_rows,
    score_parts,
    store_part,
    sin_radians,
    store_rows,
    store_split_rows,
    unmasked_tile_end,
    visible_tile_range,
)

DELTA_BLOCK = 64  # query rows per program of the delta kernel


# d_phi's constant: -2 pi from d cos(2 pi t), ln 2 as the amplitude is in base-2 logits.
PHASE_GRAD_SCALE = tl.constexpr(-TWO_PI.value * LN2.value)




@triton.jit
def score_grads(probs, dprobs, delta, amp, dist, angle, cos, FAST_MATH: tl.constexpr):
    """Gradients wrt the amplitude and the phase phi of a tile, from dP = dO.V^T (delta
    pre-broadcast): d_amp = dS cos, and d_phi without its constant PHASE_GRAD_SCALE."""
    dscores = probs * (dprobs - delta)
    d_amp = dscores * cos
    d_phi = dscores * amp * dist * sin_radians(angle, FAST_MATH)
    return d_amp, d_phi


@triton.jit
def accumulate_part(acc, grad, other_part, PAIR: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += grad . other_part: the gradient wrt the rows' part of a product row_part . other_part
    (parts and accumulators laid out as load_part's)."""
    if PAIR:
        acc = (
            tl.dot(grad.to(other_part[0].dtype), other_part[0], acc[0], input_precision=DOT_PRECISION),
            tl.dot(grad.to(other_part[1].dtype), other_part[1], acc[1], input_precision=DOT_PRECISION),
        )
    else:
        acc = tl.dot(grad.to(other_part.dtype), other_part, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def part_zeros(part, PAIR: tl.constexpr):
    """fp32 zeros shaped like a part (load_part), for its gradient's accumulator."""
    if PAIR:
        zeros = (tl.zeros(part[0].shape, tl.float32), tl.zeros(part[1].shape, tl.float32))
    else:
        zeros = tl.zeros(part.shape, tl.float32)
    return zeros


@triton.jit
def accumulate_phase_grad(
    acc, d_phi, other_phase, PHASE_QUADRATIC: tl.constexpr, DOT_PRECISION: tl.constexpr, PHASE_PAIR: tl.constexpr = False,
):
    """acc += the tile's gradient wrt the rows' phase part (without the 1/sqrt(P) scale)."""
    if PHASE_QUADRATIC:  # phi = own . other
        acc = accumulate_part(acc, d_phi, other_phase, PHASE_PAIR, DOT_PRECISION)
    else:  # phi = sum(own) + sum(other): a (rows,) vector, stored into every phase dim
        acc += tl.sum(d_phi, 1)
    return acc


@triton.jit
def phase_grad_rows(acc, PHASE_QUADRATIC: tl.constexpr):
    """The phase gradient as (rows, phase dims) for store_split_rows (linear: one column for all)."""
    if not PHASE_QUADRATIC:
        acc = acc[:, None]
    return acc


@triton.jit
def recompute_probs(amp, angle, lse, visible, MASKED: tl.constexpr, FAST_MATH: tl.constexpr):
    """Softmax probabilities of a tile from base-2 amplitudes (amp_scale log2(e) row_A . col_A)
    and the saved lse in base 2 (pre-broadcast), zero where not `visible` if MASKED; also returns
    cos(angle)."""
    cos = cos_radians(angle, FAST_MATH)
    probs = tl.exp2(amp * cos - lse)
    if MASKED:
        probs = tl.where(visible, probs, 0.0)
    return probs, cos


@triton.jit
def dkdv_query_tile(
    dk_amp, dk_phase, dv, k_amp, k_phase, v, k_pos, k_valid, q_ptr, do_ptr, lse_ptr, delta_ptr, q_pos_ptr,
    q_start, q_len, start_m, stride_qt, stride_qd, stride_dot, stride_dod, alpha, amp_scale, log2_phase_scale,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, MASKED: tl.constexpr, CONTIGUOUS: tl.constexpr,
    CAUSAL: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    AMP_PAIR: tl.constexpr, PHASE_PAIR: tl.constexpr,
):
    """One query tile's contribution to a key tile's dK, dV (tiles are keys x queries). MASKED=False:
    every query of the tile sees every key (hidden_tile_end), so no causal compare per score."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_valid = offs_m < q_len
    q_pos = load_positions(q_pos_ptr, q_start, offs_m, q_len)
    q_amp, q_phase = load_split_rows(
        q_ptr, q_start, offs_m, q_len, stride_qt, stride_qd, AMP, PHASE, AMP_PAD, PHASE_PAD, PHASE_QUADRATIC,
        AMP_PAIR, PHASE_PAIR,
    )
    do = load_rows(do_ptr, q_start, offs_m, q_len, stride_dot, stride_dod, tl.arange(0, HEAD_DIM), HEAD_DIM)
    lse = tl.load(lse_ptr + offs_m, mask=q_valid, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + offs_m, mask=q_valid, other=0.0)
    amp, dist, angle = score_parts(
        k_amp, k_phase, q_amp, q_phase, k_pos, q_pos, alpha, log2_phase_scale, PHASE_QUADRATIC, CONTIGUOUS,
        DOT_PRECISION, FAST_MATH, AMP_PAIR, PHASE_PAIR,
    )
    amp *= amp_scale * LOG2E
    visible = is_visible(q_pos[None, :], k_pos[:, None], q_valid[None, :], k_valid[:, None], CAUSAL)
    probs, cos = recompute_probs(amp, angle, lse[None, :], visible, MASKED, FAST_MATH)
    dv = tl.dot(probs.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dprobs = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    d_amp, d_phi = score_grads(probs, dprobs, delta[None, :], amp, dist, angle, cos, FAST_MATH)
    dk_amp = accumulate_part(dk_amp, d_amp, q_amp, AMP_PAIR, DOT_PRECISION)
    dk_phase = accumulate_phase_grad(dk_phase, d_phi, q_phase, PHASE_QUADRATIC, DOT_PRECISION, PHASE_PAIR)
    return dk_amp, dk_phase, dv


@triton.jit
def dq_key_tile(
    dq_amp, dq_phase, q_amp, q_phase, do, lse, delta, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len,
    start_n, stride_kt, stride_kd, stride_vt, stride_vd, alpha, amp_scale, log2_phase_scale,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, MASKED: tl.constexpr, CONTIGUOUS: tl.constexpr,
    CAUSAL: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile's contribution to a query tile's dQ. MASKED=False: every query of the tile
    sees every key (unmasked_tile_end), so no causal compare per score."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_pos = load_positions(k_pos_ptr, k_start, offs_n, k_len)
    k_amp, k_phase = load_split_rows(
        k_ptr, k_start, offs_n, k_len, stride_kt, stride_kd, AMP, PHASE, AMP_PAD, PHASE_PAD, PHASE_QUADRATIC
    )
    v = load_rows(v_ptr, k_start, offs_n, k_len, stride_vt, stride_vd, tl.arange(0, HEAD_DIM), HEAD_DIM)
    amp, dist, angle = score_parts(
        q_amp, q_phase, k_amp, k_phase, q_pos, k_pos, alpha, log2_phase_scale, PHASE_QUADRATIC, CONTIGUOUS,
        DOT_PRECISION, FAST_MATH,
    )
    amp *= amp_scale * LOG2E
    visible = is_visible(q_pos[:, None], k_pos[None, :], q_valid[:, None], (offs_n < k_len)[None, :], CAUSAL)
    probs, cos = recompute_probs(amp, angle, lse[:, None], visible, MASKED, FAST_MATH)
    dprobs = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    d_amp, d_phi = score_grads(probs, dprobs, delta[:, None], amp, dist, angle, cos, FAST_MATH)
    dq_amp = tl.dot(d_amp.to(k_amp.dtype), k_amp, dq_amp, input_precision=DOT_PRECISION)
    dq_phase = accumulate_phase_grad(dq_phase, d_phi, k_phase, PHASE_QUADRATIC, DOT_PRECISION)
    return dq_amp, dq_phase


@triton.jit
def dkdv_query_tiles(
    dk_amp, dk_phase, dv, k_amp, k_phase, v, k_pos, k_valid, q_ptr, do_ptr, lse_ptr, delta_ptr, q_pos_ptr,
    q_start, q_len, kv_head, group, total_q, lo, mid, hi, stride_qh, stride_doh,
    stride_qt, stride_qd, stride_dot, stride_dod, alpha, amp_scale, log2_phase_scale,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, CONTIGUOUS: tl.constexpr, CAUSAL: tl.constexpr,
    FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    AMP_PAIR: tl.constexpr, PHASE_PAIR: tl.constexpr,
):
    """The query tiles [lo, hi) of every query head of the group: masked before mid, then unmasked."""
    for head in range(kv_head * group, (kv_head + 1) * group):
        q_head_ptr = q_ptr + head * stride_qh
        do_head_ptr = do_ptr + head * stride_doh
        lse_head_ptr = lse_ptr + head * total_q + q_start
        delta_head_ptr = delta_ptr + head * total_q + q_start
        for start_m in range(lo, mid, BLOCK_M):
            dk_amp, dk_phase, dv = dkdv_query_tile(
                dk_amp, dk_phase, dv, k_amp, k_phase, v, k_pos, k_valid, q_head_ptr, do_head_ptr,
                lse_head_ptr, delta_head_ptr, q_pos_ptr, q_start, q_len, start_m,
                stride_qt, stride_qd, stride_dot, stride_dod, alpha, amp_scale, log2_phase_scale,
                AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, True, CONTIGUOUS, CAUSAL, FAST_MATH,
                DOT_PRECISION, BLOCK_M, AMP_PAIR, PHASE_PAIR,
            )
        for start_m in range(mid, hi, BLOCK_M):
            dk_amp, dk_phase, dv = dkdv_query_tile(
                dk_amp, dk_phase, dv, k_amp, k_phase, v, k_pos, k_valid, q_head_ptr, do_head_ptr,
                lse_head_ptr, delta_head_ptr, q_pos_ptr, q_start, q_len, start_m,
                stride_qt, stride_qd, stride_dot, stride_dod, alpha, amp_scale, log2_phase_scale,
                AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, False, CONTIGUOUS, CAUSAL, FAST_MATH,
                DOT_PRECISION, BLOCK_M, AMP_PAIR, PHASE_PAIR,
            )
    return dk_amp, dk_phase, dv


@triton.jit
def dq_key_tiles(
    dq_amp, dq_phase, q_amp, q_phase, do, lse, delta, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len,
    lo, mid, hi, stride_kt, stride_kd, stride_vt, stride_vd, alpha, amp_scale, log2_phase_scale,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, CONTIGUOUS: tl.constexpr, CAUSAL: tl.constexpr,
    FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The key tiles [lo, hi): unmasked before mid, then masked."""
    for start_n in range(lo, mid, BLOCK_N):
        dq_amp, dq_phase = dq_key_tile(
            dq_amp, dq_phase, q_amp, q_phase, do, lse, delta, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len,
            start_n, stride_kt, stride_kd, stride_vt, stride_vd, alpha, amp_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, False, CONTIGUOUS, CAUSAL, FAST_MATH,
            DOT_PRECISION, BLOCK_N,
        )
    for start_n in range(mid, hi, BLOCK_N):
        dq_amp, dq_phase = dq_key_tile(
            dq_amp, dq_phase, q_amp, q_phase, do, lse, delta, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len,
            start_n, stride_kt, stride_kd, stride_vt, stride_vd, alpha, amp_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, True, CONTIGUOUS, CAUSAL, FAST_MATH,
            DOT_PRECISION, BLOCK_N,
        )
    return dq_amp, dq_phase


@triton.jit
def _tapa_bwd_delta_kernel(
    out_ptr, do_ptr, dlse_ptr, delta_ptr, total_q,
    stride_ot, stride_oh, stride_od,
    stride_dot, stride_doh, stride_dod,
    stride_dlse_h, stride_dlse_t,
    HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)  # int64: head * total_q passes 2^31 (32 heads x 67M tokens)
    dims = tl.arange(0, HEAD_DIM)
    out = load_rows(out_ptr + head * stride_oh, 0, rows, total_q, stride_ot, stride_od, dims, HEAD_DIM)
    do = load_rows(do_ptr + head * stride_doh, 0, rows, total_q, stride_dot, stride_dod, dims, HEAD_DIM)
    delta = tl.sum(out.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:  # d lse_i / d s_ij = P_ij: it enters dS exactly like -delta_i
        delta -= tl.load(dlse_ptr + head * stride_dlse_h + rows.to(tl.int64) * stride_dlse_t, mask=rows < total_q)
    tl.store(delta_ptr + head * total_q + rows, delta, mask=rows < total_q)


@triton.jit
def _tapa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_seqlens_q, cu_seqlens_k, q_pos_ptr, k_pos_ptr, contiguous_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd,
    total_q, alpha, amp_scale, log2_phase_scale, group,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, CAUSAL: tl.constexpr,
    FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL_POWER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCAN_TILES: tl.constexpr,
):
    block_n = tl.program_id(0)
    doc = tl.program_id(1)
    kv_head = tl.program_id(2).to(tl.int64)  # int64: head * total_q and head * stride pass 2^31
    k_start = tl.load(cu_seqlens_k + doc)
    k_len = tl.load(cu_seqlens_k + doc + 1) - k_start
    if block_n * BLOCK_N >= k_len:
        return
    q_start = tl.load(cu_seqlens_q + doc)
    q_len = tl.load(cu_seqlens_q + doc + 1) - q_start

    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    # At D = 128 a part that is not a power of two (theta 0.25 / 0.75: 96 dims) is a pair of tiles
    # (load_part): padded to 128, dK's accumulators would hold 160 dims of a 128-dim row and spill
    # (quadratic 156/220 B, linear theta 0.75 20 B). At D = 64 the padded tiles take fewer
    # instructions per score than the extra products (41.8 against 43.1 quadratic) and fit.
    AMP_PAIR: tl.constexpr = HEAD_DIM > 64 and AMP < AMP_PAD
    PHASE_PAIR: tl.constexpr = HEAD_DIM > 64 and PHASE_QUADRATIC and PHASE < PHASE_PAD
    k_amp, k_phase = load_split_rows(
        k_ptr + kv_head * stride_kh, k_start, offs_n, k_len, stride_kt, stride_kd,
        AMP, PHASE, AMP_PAD, PHASE_PAD, PHASE_QUADRATIC, AMP_PAIR, PHASE_PAIR,
    )
    v = load_rows(v_ptr + kv_head * stride_vh, k_start, offs_n, k_len, stride_vt, stride_vd, dims, HEAD_DIM)
    k_pos = load_positions(k_pos_ptr, k_start, offs_n, k_len)

    # Tiles are keys x queries here: rows are keys, so the grads come out without transposes.
    dk_amp = part_zeros(k_amp, AMP_PAIR)
    dk_phase = part_zeros(k_phase, PHASE_PAIR)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    # Query tiles that can see this key tile: the same for every query head of the group.
    lo, hi = visible_tile_range(q_pos_ptr, q_start, q_len, tl.min(k_pos, 0), BLOCK_M, SCAN_TILES, False, CAUSAL)
    # Query tiles on the diagonal (some query before some key) first, masked; then the ones that
    # see every key of the tile, with no causal compare and no select per score.
    mid = hidden_tile_end(q_pos_ptr, q_start, q_len, lo, hi, tl.max(k_pos, 0), BLOCK_M, SCAN_TILES, CAUSAL)
    # Documents whose query and key positions both count up by one (contiguous_documents) take the
    # power once per tile diagonal; the others per score.
    contiguous = tl.load(contiguous_ptr + doc) != 0 if DIAGONAL_POWER else False
    if contiguous:
        dk_amp, dk_phase, dv = dkdv_query_tiles(
            dk_amp, dk_phase, dv, k_amp, k_phase, v, k_pos, offs_n < k_len, q_ptr, do_ptr, lse_ptr, delta_ptr,
            q_pos_ptr, q_start, q_len, kv_head, group, total_q, lo, mid, hi, stride_qh, stride_doh,
            stride_qt, stride_qd, stride_dot, stride_dod, alpha, amp_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, True, CAUSAL, FAST_MATH, DOT_PRECISION, BLOCK_M,
            AMP_PAIR, PHASE_PAIR,
        )
    else:
        dk_amp, dk_phase, dv = dkdv_query_tiles(
            dk_amp, dk_phase, dv, k_amp, k_phase, v, k_pos, offs_n < k_len, q_ptr, do_ptr, lse_ptr, delta_ptr,
            q_pos_ptr, q_start, q_len, kv_head, group, total_q, lo, mid, hi, stride_qh, stride_doh,
            stride_qt, stride_qd, stride_dot, stride_dod, alpha, amp_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, False, CAUSAL, FAST_MATH, DOT_PRECISION, BLOCK_M,
            AMP_PAIR, PHASE_PAIR,
        )

    dk_ptr += kv_head * stride_dkh
    store_part(dk_ptr, dk_amp, amp_scale, k_start, offs_n, k_len, stride_dkt, stride_dkd, AMP, AMP_PAD, AMP_PAIR)
    store_part(
        dk_ptr + AMP * stride_dkd, phase_grad_rows(dk_phase, PHASE_QUADRATIC), PHASE_GRAD_SCALE,
        k_start, offs_n, k_len, stride_dkt, stride_dkd, PHASE, PHASE_PAD, PHASE_PAIR,
    )
    store_rows(dv_ptr + kv_head * stride_dvh, dv, k_start, offs_n, k_len, stride_dvt, stride_dvd, dims, HEAD_DIM)


@triton.jit
def _tapa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_seqlens_q, cu_seqlens_k, q_pos_ptr, k_pos_ptr, contiguous_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh, stride_dqd,
    total_q, alpha, amp_scale, log2_phase_scale, group,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, CAUSAL: tl.constexpr,
    FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL_POWER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCAN_TILES: tl.constexpr,
):
    block_m = tl.program_id(0)
    doc = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)  # int64: head * total_q and head * stride pass 2^31
    q_start = tl.load(cu_seqlens_q + doc)
    q_len = tl.load(cu_seqlens_q + doc + 1) - q_start
    if block_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_seqlens_k + doc)
    k_len = tl.load(cu_seqlens_k + doc + 1) - k_start
    k_ptr += (head // group) * stride_kh
    v_ptr += (head // group) * stride_vh

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_valid = offs_m < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_amp, q_phase = load_split_rows(
        q_ptr + head * stride_qh, q_start, offs_m, q_len, stride_qt, stride_qd,
        AMP, PHASE, AMP_PAD, PHASE_PAD, PHASE_QUADRATIC,
    )
    do = load_rows(do_ptr + head * stride_doh, q_start, offs_m, q_len, stride_dot, stride_dod, dims, HEAD_DIM)
    lse = tl.load(lse_ptr + head * total_q + q_start + offs_m, mask=q_valid, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + head * total_q + q_start + offs_m, mask=q_valid, other=0.0)
    q_pos = load_positions(q_pos_ptr, q_start, offs_m, q_len)

    dq_amp = tl.zeros((BLOCK_M, AMP_PAD), tl.float32)
    dq_phase = tl.zeros(q_phase.shape, tl.float32)
    lo, hi = visible_tile_range(k_pos_ptr, k_start, k_len, tl.max(q_pos, 0), BLOCK_N, SCAN_TILES, True, CAUSAL)
    # Key tiles every query sees first, with no mask; then the diagonal / partial ones, masked.
    mid = unmasked_tile_end(k_pos_ptr, k_start, k_len, lo, hi, tl.min(q_pos, 0), BLOCK_N, SCAN_TILES, CAUSAL)
    contiguous = tl.load(contiguous_ptr + doc) != 0 if DIAGONAL_POWER else False
    if contiguous:  # as in the dK/dV kernel
        dq_amp, dq_phase = dq_key_tiles(
            dq_amp, dq_phase, q_amp, q_phase, do, lse, delta, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len,
            lo, mid, hi, stride_kt, stride_kd, stride_vt, stride_vd, alpha, amp_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, True, CAUSAL, FAST_MATH, DOT_PRECISION, BLOCK_N,
        )
    else:
        dq_amp, dq_phase = dq_key_tiles(
            dq_amp, dq_phase, q_amp, q_phase, do, lse, delta, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len,
            lo, mid, hi, stride_kt, stride_kd, stride_vt, stride_vd, alpha, amp_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, False, CAUSAL, FAST_MATH, DOT_PRECISION, BLOCK_N,
        )

    store_split_rows(
        dq_ptr + head * stride_dqh, dq_amp * amp_scale, phase_grad_rows(dq_phase * PHASE_GRAD_SCALE, PHASE_QUADRATIC),
        q_start, offs_m, q_len, stride_dqt, stride_dqd, AMP, PHASE, AMP_PAD, PHASE_PAD,
    )


def padded_width(head_dim, amp_dim):
    """Dims the amplitude and phase parts of a row take in the kernels, each padded to a power of
    two: head_dim for theta 0.5, more for 0.25 / 0.75 (D = 128: 32 + 128)."""
    return triton.next_power_of_2(amp_dim) + triton.next_power_of_2(head_dim - amp_dim)


def dkdv_config(dtype, head_dim, amp_dim, interpreted):
    """Launch options of the dK/dV kernel (BLOCK_M: queries per step, BLOCK_N: keys per program).
    Chosen like the forward's: not autotuned, the tiles with the fewest instructions per score of
    those that compile for sm_90 without spills (scripts/compile_kernels.py --check). Each key row
    accumulates dK (head_dim fp32 at D = 128, where a 96-dim part is a pair of tiles; padded_width at
    D = 64) and dV (head_dim): at D = 128 that is 128 registers a thread of a 64-row warpgroup before
    any score, so only 16 queries a step fit, and a second pipeline stage only at theta 0.5 (quadratic
    theta 0.25 / 0.75 still spill 36 B with one, outside the loops). fp32 products run exactly on CUDA cores and hold more
    registers: smaller tiles."""
    if interpreted:
        return dict(BLOCK_M=32, BLOCK_N=32, SCAN_TILES=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=16, BLOCK_N=32, SCAN_TILES=64, num_warps=8, num_stages=2)
    if head_dim > 64:  # two warpgroups of 64 keys each
        # Two stages where the parts fill their tiles (theta 0.5): one stage spilled 36 B with Triton
        # 3.7. Where a 96-dim part is a pair of tiles, a second stage spills 60-108 B: one.
        stages = 1 if padded_width(head_dim, amp_dim) > head_dim else 2
        return dict(BLOCK_M=16, BLOCK_N=128, SCAN_TILES=64, num_warps=mma_warps(128), num_stages=stages)
    if padded_width(head_dim, amp_dim) > head_dim:
        return dict(BLOCK_M=16, BLOCK_N=64, SCAN_TILES=64, num_warps=mma_warps(64), num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=128, SCAN_TILES=64, num_warps=mma_warps(128), num_stages=2)  # 2 warpgroups


def dq_config(dtype, head_dim, amp_dim, interpreted):
    """Launch options of the dQ kernel (BLOCK_M: queries per program, BLOCK_N: keys per step);
    chosen as dkdv_config's."""
    if interpreted:
        return dict(BLOCK_M=32, BLOCK_N=32, SCAN_TILES=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, SCAN_TILES=64, num_warps=8, num_stages=2)
    stages = 1 if head_dim > 64 and padded_width(head_dim, amp_dim) > head_dim else 2
    return dict(BLOCK_M=64, BLOCK_N=32, SCAN_TILES=64, num_warps=mma_warps(64), num_stages=stages)


def tapa_bwd(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos, k_pos,
    *, alpha, amp_dim, phase, causal, dlse=None,
):
    """Gradients of TAPA attention (layout as in `tapa_fwd`). Returns dq, dk, dv in the input dtypes.

    dlse (Hq, total_q), optional: the gradient wrt lse when lse feeds later computations (merging
    partial attentions); rows with lse -inf get zero gradients.
    """
    options = kernel_options(q, k, amp_dim, phase, causal)
    total_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    n_docs = cu_seqlens_q.numel() - 1
    if total_q == 0 or k.shape[0] == 0 or n_docs == 0:
        return dq, dk, dv
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.int(), cu_seqlens_k.int()
    q_pos, k_pos = q_pos.long().contiguous(), k_pos.long().contiguous()
    lse = lse.float().contiguous()  # the kernels index it as (Hq, total_q)
    scalars = dict(**kernel_scalars(alpha, amp_dim, head_dim), group=heads_q // heads_kv, total_q=total_q)

    delta = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    dlse_arg = dlse if dlse is not None else delta  # an unused pointer when there is no dlse
    _tapa_bwd_delta_kernel[(triton.cdiv(total_q, DELTA_BLOCK), heads_q)](
        out, do, dlse_arg, delta, total_q, *out.stride(), *do.stride(), *dlse_arg.stride(),
        HEAD_DIM=head_dim, HAS_DLSE=dlse is not None, BLOCK_M=DELTA_BLOCK,
    )
    contiguous = contiguous_documents(cu_seqlens_q, cu_seqlens_k, q_pos, k_pos)
    common = (cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, contiguous, *q.stride(), *k.stride(), *v.stride(), *do.stride())
    config = dkdv_config(q.dtype, head_dim, amp_dim, interpreting(q))
    _tapa_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, config["BLOCK_N"]), n_docs, heads_kv)](
        q, k, v, do, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), **scalars, **options, **config
    )
    config = dq_config(q.dtype, head_dim, amp_dim, interpreting(q))
    _tapa_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, config["BLOCK_M"]), n_docs, heads_q)](
        q, k, v, do, lse, delta, dq, *common, *dq.stride(), **scalars, **options, **config
    )
    return dq, dk, dv
