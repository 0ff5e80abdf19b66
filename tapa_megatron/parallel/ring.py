"""Ring (p2p) context-parallel attention (TAPA or softmax: any op with the (out, lse) contract).

Every rank keeps its queries; key/value blocks travel around the ring (with their positions, unless the
layout fixes them), one hop per step, while the rank attends to the block it holds: CP steps, the next
block's transfer overlapping the current block's compute. Each step yields a partial (out, lse) over the keys of one
block; partials merge exactly in fp32 (the op's (out, lse) contract).

With the load-balanced (zigzag) layout, rank r holds chunks r and 2CP-1-r, and a block from rank j
falls in one of three cases, so fully masked work is never done:
    j == r   diagonal: causal attention within the shard
    j <  r   lower:    every query sees the block's first chunk only (unmasked)
    j >  r   upper:    only the shard's second chunk sees the block, all of it (unmasked)
With arbitrary positions (no layout given) or packed documents, every step is computed causally by
positions instead (the kernels skip tiles that are masked whole).

The ring knows the op only through two functions (see `__init__.py`): partial_forward(q, k, v, q_pos,
k_pos, causal) -> (out, lse) and partial_backward(d_out, d_lse, q, k, v, out, lse, q_pos, k_pos, causal)
-> (dq, dk, dv), the latter given the final, merged out and lse.

Backward: the same ring again. Each rank computes the gradients of the block it holds from the final
out and lse; dK/dV accumulate as they travel with their block, and arrive home after the last hop.
"""

import torch
import torch.distributed as dist

from tapa_megatron.parallel.comm import ring_exchange, wait


def _block_case(step, src, rank, zigzag):
    if step == 0:
        return "diagonal"
    if not zigzag:
        return "general"
    return "lower" if src < rank else "upper"


def _parts(case, q, q_pos, k, v, k_pos):
    """(query rows, q, q_pos, k, v, k_pos, causal) for one block in its case."""
    half = q.shape[1] // 2
    if case == "lower":
        k_half = k.shape[1] // 2
        return slice(None), q, q_pos, k[:, :k_half], v[:, :k_half], k_pos[:, :k_half], False
    if case == "upper":
        return slice(half, None), q[:, half:], q_pos[:, half:], k, v, k_pos, False
    return slice(None), q, q_pos, k, v, k_pos, True


def _merge_into(out_acc, lse_acc, out, lse, rows):
    """Merge a partial (out (B, s, H, D), lse (B, H, s)) into the accumulators' rows, in place."""
    prev_out, prev_lse = out_acc[:, rows], lse_acc[:, :, rows]
    new_lse = torch.logaddexp(prev_lse, lse)
    finite = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    weight_prev = torch.exp(prev_lse - finite).transpose(1, 2).unsqueeze(-1)
    weight_new = torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1)
    out_acc[:, rows] = weight_prev * prev_out + weight_new * out.to(out_acc.dtype)
    lse_acc[:, :, rows] = new_lse


def _held_block(block, step, rank, size, positions_of):
    """(k, v, k_pos) of the block held at this step: positions travel with it, or follow from the layout."""
    if positions_of is None:
        return block
    return (*block, positions_of((rank - step) % size))


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, group, positions_of, partial_forward, partial_backward):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        zigzag = positions_of is not None
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        lse_acc = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc_dtype, device=q.device)
        block = (k, v) if zigzag else (k, v, k_pos)
        for step in range(size):
            pending = ring_exchange(block, group) if step + 1 < size else None  # overlaps this step's compute
            case = _block_case(step, (rank - step) % size, rank, zigzag)
            held = _held_block(block, step, rank, size, positions_of)
            rows, q_part, q_pos_part, k_part, v_part, k_pos_part, causal = _parts(case, q, q_pos, *held)
            out, lse = partial_forward(q_part, k_part, v_part, q_pos_part, k_pos_part, causal)
            _merge_into(out_acc, lse_acc, out, lse, rows)
            if pending is not None:
                block, requests = pending
                wait(requests)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, q_pos, k_pos, out, lse_acc)
        ctx.group, ctx.positions_of, ctx.partial_backward = group, positions_of, partial_backward
        return out, lse_acc

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, q_pos, k_pos, out, lse = ctx.saved_tensors
        group = ctx.group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        acc_dtype = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)  # the held block's gradients, travelling
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        zigzag = ctx.positions_of is not None
        block = (k, v) if zigzag else (k, v, k_pos)
        for step in range(size):
            pending = ring_exchange(block, group) if step + 1 < size else None
            case = _block_case(step, (rank - step) % size, rank, zigzag)
            held = _held_block(block, step, rank, size, ctx.positions_of)
            rows, q_part, q_pos_part, k_part, v_part, k_pos_part, causal = _parts(case, q, q_pos, *held)
            grads = ctx.partial_backward(d_out[:, rows], None if d_lse is None else d_lse[:, :, rows], q_part, k_part,
                                         v_part, out[:, rows], lse[:, :, rows], q_pos_part, k_pos_part, causal)
            dq[:, rows] += grads[0]
            keys = slice(None, k_part.shape[1])  # the lower case touches the block's first chunk only
            dk[:, keys] += grads[1]
            dv[:, keys] += grads[2]
            (dk, dv), requests = ring_exchange((dk, dv), group)  # on to the next holder; home after the last hop
            wait(requests)
            if pending is not None:
                block, requests = pending
                wait(requests)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, q_pos, k_pos, group, positions_of, partial_forward, partial_backward):
    """This rank's (out, lse) of causal attention over the ring; q, k, v (B, S_local, H, D).

    positions_of(rank) -> that rank's key positions (B, S_local) when the zigzag layout fixes them (no
    position messages, half-block cases); None: arbitrary positions, which travel with their block."""
    return RingAttention.apply(q, k, v, q_pos, k_pos, group, positions_of, partial_forward, partial_backward)
