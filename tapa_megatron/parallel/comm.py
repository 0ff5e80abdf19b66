"""Differentiable collectives over the context-parallel group (gloo on CPU, NCCL on GPU)."""

import torch
import torch.distributed as dist


class _GatherSequence(torch.autograd.Function):
    """Concatenate every rank's x along dim, in rank order. Backward: each rank's slice of the summed
    gradient (every rank used every shard)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank], None, None


def gather_sequence(x, group, dim=1):
    return _GatherSequence.apply(x, dim, group)


def gather_positions(positions, group, dim=-1):
    parts = [torch.empty_like(positions, memory_format=torch.contiguous_format)
             for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, positions.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _all_to_all(x, scatter_dim, gather_dim, group):
    size = dist.get_world_size(group)
    inputs = [part.contiguous() for part in x.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(size)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Split x along scatter_dim across ranks, concatenate what arrives along gather_dim; the backward
    is the same exchange the other way round."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def sequence_to_heads(x, group):
    """(B, S/CP, H, D) sequence shards -> (B, S, H/CP, D) head shards (sequence in rank order)."""
    return _AllToAll.apply(x, 2, 1, group)


def heads_to_sequence(x, group):
    """(B, S, H/CP, D) -> (B, S/CP, H, D): the inverse of sequence_to_heads."""
    return _AllToAll.apply(x, 1, 2, group)


def ring_exchange(tensors, group):
    """Send tensors to the next rank of the ring and receive the previous rank's into new buffers.
    Returns (buffers, requests); wait on the requests before reading the buffers."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    next_rank = dist.get_global_rank(group, (rank + 1) % size)
    prev_rank = dist.get_global_rank(group, (rank - 1) % size)
    buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), next_rank, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, prev_rank, group) for b in buffers]
    return buffers, dist.batch_isend_irecv(ops)


def wait(requests):
    for request in requests:
        request.wait()
