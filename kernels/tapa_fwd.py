"""TAPA attention forward: one fused kernel, flash-attention style, over packed (varlen) documents.

Each program owns BLOCK_M queries of one (document, query head); it walks the document's key
tiles, recomputes the TAPA scores and keeps an online softmax in base 2. The launcher helpers at
the bottom of this file are shared with the backward launcher.
"""

import math
import os

import torch
import triton
import triton.language as tl

from tapa_kernels.tapa_score import (
    cos_radians,
    is_visible,
    load_positions,
    load_rows,
    load_split_rows,
    score_parts,
    store_rows,
    unmasked_tile_end,
    visible_tile_range,
)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def attend_key_tile(
    row_max, row_sum, acc, q_amp, q_phase, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len, start_n,
    stride_kt, stride_kd, stride_vt, stride_vd, alpha, score_scale, log2_phase_scale,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, MASKED: tl.constexpr, CONTIGUOUS: tl.constexpr,
    CAUSAL: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of the online softmax. MASKED=False: every key of the tile is visible to every
    query (unmasked_tile_end), so no causal compare and no -inf per score. score_scale turns
    amp * cos into base-2 logits: amp_scale * log2(e)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_pos = load_positions(k_pos_ptr, k_start, offs_n, k_len)
    k_amp, k_phase = load_split_rows(
        k_ptr, k_start, offs_n, k_len, stride_kt, stride_kd, AMP, PHASE, AMP_PAD, PHASE_PAD, PHASE_QUADRATIC
    )
    amp, dist, angle = score_parts(
        q_amp, q_phase, k_amp, k_phase, q_pos, k_pos, alpha, log2_phase_scale, PHASE_QUADRATIC, CONTIGUOUS,
        DOT_PRECISION, FAST_MATH,
    )
    # The running max is of the unscaled scores amp * cos; the scale (> 0, so it commutes with the
    # max) enters in the exponent's FFMA: one multiply per score fewer than scaling every score.
    scores = amp * cos_radians(angle, FAST_MATH)
    if MASKED:
        visible = is_visible(q_pos[:, None], k_pos[None, :], q_valid[:, None], (offs_n < k_len)[None, :], CAUSAL)
        scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    # Rows with no visible key yet keep max -inf: subtract 0 instead, so exp2 gives 0, not NaN.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.exp2(scores * score_scale - (safe_max * score_scale)[:, None])
    rescale = tl.exp2((row_max - safe_max) * score_scale)
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    v = load_rows(v_ptr, k_start, offs_n, k_len, stride_vt, stride_vd, tl.arange(0, HEAD_DIM), HEAD_DIM)
    acc = tl.dot(probs.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
    return new_max, row_sum, acc


@triton.jit
def attend_key_tiles(
    row_max, row_sum, acc, q_amp, q_phase, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len, lo, mid, hi,
    stride_kt, stride_kd, stride_vt, stride_vd, alpha, score_scale, log2_phase_scale,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, CONTIGUOUS: tl.constexpr, CAUSAL: tl.constexpr,
    FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The key tiles [lo, hi): every query sees the ones before mid, with no mask; the rest masked."""
    for start_n in range(lo, mid, BLOCK_N):
        row_max, row_sum, acc = attend_key_tile(
            row_max, row_sum, acc, q_amp, q_phase, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len, start_n,
            stride_kt, stride_kd, stride_vt, stride_vd, alpha, score_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, False, CONTIGUOUS, CAUSAL, FAST_MATH,
            DOT_PRECISION, BLOCK_N,
        )
    for start_n in range(mid, hi, BLOCK_N):
        row_max, row_sum, acc = attend_key_tile(
            row_max, row_sum, acc, q_amp, q_phase, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len, start_n,
            stride_kt, stride_kd, stride_vt, stride_vd, alpha, score_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, True, CONTIGUOUS, CAUSAL, FAST_MATH,
            DOT_PRECISION, BLOCK_N,
        )
    return row_max, row_sum, acc


@triton.jit
def _tapa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    cu_seqlens_q, cu_seqlens_k, q_pos_ptr, k_pos_ptr, contiguous_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_lse_h,
    alpha, amp_scale, log2_phase_scale, group,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PHASE_QUADRATIC: tl.constexpr, CAUSAL: tl.constexpr,
    FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL_POWER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCAN_TILES: tl.constexpr,
):
    block_m = tl.program_id(0)
    doc = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)  # int64: head * stride passes 2^31 (32 heads x 67M tokens)
    q_start = tl.load(cu_seqlens_q + doc)
    q_len = tl.load(cu_seqlens_q + doc + 1) - q_start
    if block_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_seqlens_k + doc)
    k_len = tl.load(cu_seqlens_k + doc + 1) - k_start
    q_ptr += head * stride_qh
    k_ptr += (head // group) * stride_kh
    v_ptr += (head // group) * stride_vh

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_valid = offs_m < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_amp, q_phase = load_split_rows(
        q_ptr, q_start, offs_m, q_len, stride_qt, stride_qd, AMP, PHASE, AMP_PAD, PHASE_PAD, PHASE_QUADRATIC
    )
    q_pos = load_positions(q_pos_ptr, q_start, offs_m, q_len)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of amp * cos (unscaled)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    score_scale = amp_scale * LOG2E  # amp * cos -> base-2 logits
    lo, hi = visible_tile_range(k_pos_ptr, k_start, k_len, tl.max(q_pos, 0), BLOCK_N, SCAN_TILES, True, CAUSAL)
    # Key tiles every query sees first, with no mask; then the diagonal / partial ones, masked.
    mid = unmasked_tile_end(k_pos_ptr, k_start, k_len, lo, hi, tl.min(q_pos, 0), BLOCK_N, SCAN_TILES, CAUSAL)
    # Documents whose query and key positions both count up by one (contiguous_documents) take the
    # power once per tile diagonal; the others per score.
    contiguous = tl.load(contiguous_ptr + doc) != 0 if DIAGONAL_POWER else False
    if contiguous:
        row_max, row_sum, acc = attend_key_tiles(
            row_max, row_sum, acc, q_amp, q_phase, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len, lo, mid, hi,
            stride_kt, stride_kd, stride_vt, stride_vd, alpha, score_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, True, CAUSAL, FAST_MATH, DOT_PRECISION, BLOCK_N,
        )
    else:
        row_max, row_sum, acc = attend_key_tiles(
            row_max, row_sum, acc, q_amp, q_phase, q_pos, q_valid, k_ptr, v_ptr, k_pos_ptr, k_start, k_len, lo, mid, hi,
            stride_kt, stride_kd, stride_vt, stride_vd, alpha, score_scale, log2_phase_scale,
            AMP, PHASE, AMP_PAD, PHASE_PAD, HEAD_DIM, PHASE_QUADRATIC, False, CAUSAL, FAST_MATH, DOT_PRECISION, BLOCK_N,
        )

    has_key = row_sum > 0
    out = acc / tl.where(has_key, row_sum, 1.0)[:, None]
    store_rows(out_ptr + head * stride_oh, out, q_start, offs_m, q_len, stride_ot, stride_od, dims, HEAD_DIM)
    lse = tl.where(has_key, (row_max * score_scale + tl.log2(tl.where(has_key, row_sum, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + head * stride_lse_h + q_start + offs_m, lse, mask=q_valid)


# ---------------------------------------------------------------------------------------------
# Launchers


def interpreting(x: torch.Tensor) -> bool:
    """True when the kernels run in Triton's CPU interpreter (no inline assembly there)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or x.device.type != "cuda"


def kernel_options(q, k, amp_dim, phase, causal):
    """Checks what the kernels themselves need; returns the constexpr arguments they share."""
    if q.dtype != k.dtype:
        raise ValueError(f"q and k/v dtypes differ ({q.dtype}, {k.dtype}).")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"heads_q={q.shape[-2]} is not a multiple of heads_kv={k.shape[-2]}.")
    fast_math = not interpreting(q) and torch.version.hip is None  # PTX: NVIDIA GPUs only
    return kernel_constexprs(q.dtype, q.shape[-1], amp_dim, phase, causal, fast_math=fast_math)


def kernel_constexprs(dtype, head_dim, amp_dim, phase, causal, *, fast_math):
    """The constexpr arguments the kernels share, from the input dtype and sizes alone (so
    scripts/compile_kernels.py can compile the kernels without tensors or a GPU)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"The TAPA Triton kernels take fp16, bf16 or fp32 inputs, not {dtype}.")
    if head_dim not in (64, 128):
        raise ValueError(f"The TAPA Triton kernels support head_dim 64 or 128, not {head_dim}.")
    phase_dim = head_dim - amp_dim
    if amp_dim <= 0 or phase_dim <= 0 or amp_dim % 16 or phase_dim % 16:
        raise ValueError(
            f"amplitude width {amp_dim} and phase width {phase_dim} (head_dim {head_dim}) must both be positive "
            f"multiples of 16 for the Triton kernels (tl.dot tiles); e.g. theta 0.25, 0.5 or 0.75."
        )
    if phase not in ("quadratic", "linear"):
        raise ValueError(f"phase={phase!r} is unknown; use 'quadratic' or 'linear'.")
    return dict(
        AMP=amp_dim,
        PHASE=phase_dim,
        AMP_PAD=triton.next_power_of_2(amp_dim),
        PHASE_PAD=triton.next_power_of_2(phase_dim),
        HEAD_DIM=head_dim,
        PHASE_QUADRATIC=phase == "quadratic",
        CAUSAL=bool(causal),
        FAST_MATH=fast_math,
        # The phase amplifies dot-product error: fp32 inputs need exact fp32 products, not tf32.
        # (The precision setting only affects fp32 operands; for fp16 / bf16 the default is kept.)
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        # |m - n|^alpha once per tile diagonal for contiguous documents (diagonal_distance_power); not
        # for fp32 on the GPU, whose CUDA-core products hold their operands in registers: the gathered
        # tile made those kernels spill (more). The interpreter runs it for every dtype.
        DIAGONAL_POWER=not (fast_math and dtype == torch.float32),
    )


def kernel_scalars(alpha, amp_dim, head_dim):
    """The kernels' float arguments: alpha, 1/sqrt(A) and log2 of the phase's 1/sqrt(P)."""
    return dict(alpha=float(alpha), amp_scale=1.0 / math.sqrt(amp_dim), log2_phase_scale=-0.5 * math.log2(head_dim - amp_dim))


def contiguous_documents(cu_seqlens_q, cu_seqlens_k, q_pos, k_pos):
    """int8 (n_docs,): 1 where the document's query positions and its key positions each count up
    by one (the kernels then take |m - n|^alpha once per tile diagonal). On the device, no sync."""
    def steps_by_one(pos, cu_seqlens):
        broken = torch.zeros(pos.numel() + 1, dtype=torch.int32, device=pos.device)
        broken[1:pos.numel()] = (pos[1:] - pos[:-1] != 1).int()  # broken[t]: token t does not follow t - 1
        counts = broken.cumsum(0)
        start, end = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        return counts[torch.maximum(end - 1, start)] == counts[start]  # no break in (start, end)

    return (steps_by_one(q_pos, cu_seqlens_q) & steps_by_one(k_pos, cu_seqlens_k)).to(torch.int8)


def mma_warps(tile_rows):
    """num_warps for a tile of `tile_rows` rows: each warp of an NVIDIA mma layout owns 16 rows, and
    a wgmma warpgroup (4 warps) 64, so 8 warps on a 64-row tile would both compute the same rows
    (Triton's fused-attention tutorial drops those configurations too)."""
    return 8 if tile_rows >= 128 else 4


def fwd_config(dtype, head_dim, interpreted):
    """Block sizes and launch options. Not autotuned (there was no GPU to tune on): picked among
    the tiles that Triton compiles for sm_90 with (almost) no register spills, read off ptxas'
    report of an ahead-of-time compile (scripts/compile_kernels.py). TAPA keeps more tiles live
    than flash attention (amplitude, distances, phase), hence BLOCK_N = 32. The interpreter gets
    small blocks to keep CI fast."""
    if interpreted:
        return dict(BLOCK_M=32, BLOCK_N=32, SCAN_TILES=4)
    if dtype == torch.float32:  # exact fp32 products run on CUDA cores and hold more registers
        block_m = 64 if head_dim <= 64 else 32
        return dict(BLOCK_M=block_m, BLOCK_N=32, SCAN_TILES=64, num_warps=8, num_stages=2)
    block_m = 128 if head_dim <= 64 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=32, SCAN_TILES=64, num_warps=mma_warps(block_m), num_stages=2)


def tapa_fwd(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos, k_pos, *, alpha, amp_dim, phase, causal
):
    """TAPA attention forward over packed documents.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_q/k int32 (n_docs + 1,); q_pos / k_pos
    int64 absolute positions (total_q,), (total_k,). Returns out (total_q, Hq, D) in q's dtype and
    lse (Hq, total_q) fp32; a query with no visible key gets out 0 and lse -inf.
    """
    options = kernel_options(q, k, amp_dim, phase, causal)
    total_q, heads_q, head_dim = q.shape
    out = torch.empty((total_q, heads_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    n_docs = cu_seqlens_q.numel() - 1
    if total_q == 0 or max_seqlen_q == 0 or n_docs == 0:
        return out, lse.fill_(float("-inf"))
    config = fwd_config(q.dtype, head_dim, interpreting(q))
    grid = (triton.cdiv(max_seqlen_q, config["BLOCK_M"]), n_docs, heads_q)
    q_pos, k_pos = q_pos.long().contiguous(), k_pos.long().contiguous()
    contiguous = contiguous_documents(cu_seqlens_q, cu_seqlens_k, q_pos, k_pos)
    _tapa_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q.int(), cu_seqlens_k.int(), q_pos, k_pos, contiguous,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
        **kernel_scalars(alpha, amp_dim, head_dim), group=heads_q // k.shape[1],
        **options, **config,
    )
    return out, lse
