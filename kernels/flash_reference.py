"""A plain causal flash attention (softmax(q k^T / sqrt(D)) v), the baseline of the compile report.

What a RoPE user runs, written the way the TAPA kernels are (one key loop per query tile, one query
loop per key tile, online softmax in base 2, the mask on every tile), so that
scripts/compile_kernels.py can compile both with the same Triton, target, tile shape, warps and
stages and compare instructions per score. Not used for training: one sequence per (batch, head)
row, contiguous positions, no GQA. `flash_fwd` / `flash_bwd` exist to check it against torch.
"""

import math

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def load_tile(ptr, rows, seqlen, stride_row, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + rows[:, None] * stride_row + dims[None, :], mask=(rows < seqlen)[:, None], other=0.0)


@triton.jit
def _flash_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seqlen, stride_row, stride_bh, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_m = tl.program_id(0)
    head_offset = tl.program_id(1).to(tl.int64) * stride_bh
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_tile(q_ptr + head_offset, offs_m, seqlen, stride_row, HEAD_DIM)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(0, (block_m + 1) * BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_ptr + head_offset, offs_n, seqlen, stride_row, HEAD_DIM)
        v = load_tile(v_ptr + head_offset, offs_n, seqlen, stride_row, HEAD_DIM)
        scores = tl.dot(q, tl.trans(k)) * (scale * LOG2E)
        scores = tl.where(offs_n[None, :] <= offs_m[:, None], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probs = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = tl.dot(probs.to(v.dtype), v, acc * rescale[:, None])
        row_max = new_max
    out = acc / row_sum[:, None]
    dims = tl.arange(0, HEAD_DIM)
    rows_ok = (offs_m < seqlen)[:, None]
    tl.store(out_ptr + head_offset + offs_m[:, None] * stride_row + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=rows_ok)
    lse_offset = tl.program_id(1).to(tl.int64) * seqlen
    tl.store(lse_ptr + lse_offset + offs_m, row_max + tl.log2(row_sum), mask=offs_m < seqlen)  # base 2


@triton.jit
def _flash_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seqlen, stride_row, stride_bh, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_n = tl.program_id(0)
    head_offset = tl.program_id(1).to(tl.int64) * stride_bh
    row_offset = tl.program_id(1).to(tl.int64) * seqlen
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = load_tile(k_ptr + head_offset, offs_n, seqlen, stride_row, HEAD_DIM)
    v = load_tile(v_ptr + head_offset, offs_n, seqlen, stride_row, HEAD_DIM)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    for start_m in range(block_n * BLOCK_N // BLOCK_M * BLOCK_M, seqlen, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(q_ptr + head_offset, offs_m, seqlen, stride_row, HEAD_DIM)
        do = load_tile(do_ptr + head_offset, offs_m, seqlen, stride_row, HEAD_DIM)
        lse = tl.load(lse_ptr + row_offset + offs_m, mask=offs_m < seqlen, other=0.0)
        delta = tl.load(delta_ptr + row_offset + offs_m, mask=offs_m < seqlen, other=0.0)
        scores = tl.dot(k, tl.trans(q)) * (scale * LOG2E)  # keys x queries
        visible = (offs_n[:, None] <= offs_m[None, :]) & (offs_m < seqlen)[None, :]
        probs = tl.where(visible, tl.exp2(scores - lse[None, :]), 0.0)
        dv = tl.dot(probs.to(do.dtype), do, dv)
        dprobs = tl.dot(v, tl.trans(do))
        dscores = probs * (dprobs - delta[None, :])
        dk = tl.dot(dscores.to(q.dtype), q, dk)
    dims = tl.arange(0, HEAD_DIM)
    offsets = offs_n[:, None] * stride_row + dims[None, :]
    rows_ok = (offs_n < seqlen)[:, None]
    tl.store(dk_ptr + head_offset + offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=rows_ok)
    tl.store(dv_ptr + head_offset + offsets, dv.to(dv_ptr.dtype.element_ty), mask=rows_ok)


@triton.jit
def _flash_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, seqlen, stride_row, stride_bh, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_m = tl.program_id(0)
    head_offset = tl.program_id(1).to(tl.int64) * stride_bh
    row_offset = tl.program_id(1).to(tl.int64) * seqlen
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_tile(q_ptr + head_offset, offs_m, seqlen, stride_row, HEAD_DIM)
    do = load_tile(do_ptr + head_offset, offs_m, seqlen, stride_row, HEAD_DIM)
    lse = tl.load(lse_ptr + row_offset + offs_m, mask=offs_m < seqlen, other=0.0)
    delta = tl.load(delta_ptr + row_offset + offs_m, mask=offs_m < seqlen, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(0, (block_m + 1) * BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_ptr + head_offset, offs_n, seqlen, stride_row, HEAD_DIM)
        v = load_tile(v_ptr + head_offset, offs_n, seqlen, stride_row, HEAD_DIM)
        scores = tl.dot(q, tl.trans(k)) * (scale * LOG2E)
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n < seqlen)[None, :]
        probs = tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)
        dprobs = tl.dot(do, tl.trans(v))
        dscores = probs * (dprobs - delta[:, None])
        dq = tl.dot(dscores.to(k.dtype), k, dq)
    dims = tl.arange(0, HEAD_DIM)
    rows_ok = (offs_m < seqlen)[:, None]
    tl.store(dq_ptr + head_offset + offs_m[:, None] * stride_row + dims[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=rows_ok)


def flash_fwd(q, k, v, block_m=32, block_n=32):
    """q, k, v: (heads, seqlen, D) contiguous. Returns out and the base-2 lse (heads, seqlen)."""
    heads, seqlen, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((heads, seqlen), dtype=torch.float32, device=q.device)
    _flash_fwd_kernel[(triton.cdiv(seqlen, block_m), heads)](
        q, k, v, out, lse, seqlen, q.stride(1), q.stride(0), 1.0 / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out, lse


def flash_bwd(do, q, k, v, out, lse, block_m=32, block_n=32):
    heads, seqlen, head_dim = q.shape
    delta = (out.float() * do.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (seqlen, q.stride(1), q.stride(0), 1.0 / math.sqrt(head_dim))
    sizes = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n)
    _flash_dkdv_kernel[(triton.cdiv(seqlen, block_n), heads)](q, k, v, do, lse, delta, dk, dv, *common, **sizes)
    _flash_dq_kernel[(triton.cdiv(seqlen, block_m), heads)](q, k, v, do, lse, delta, dq, *common, **sizes)
    return dq, dk, dv
