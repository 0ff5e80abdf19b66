"""Which tokens a context-parallel rank holds: Megatron's load-balanced ("zigzag") layout.

A sequence of S tokens is cut into 2·CP chunks and rank r holds chunks r and 2·CP−1−r, so every rank
gets the same share of causal attention work (an early chunk, which sees little, with a late one,
which sees much). Packed documents are balanced one document at a time: each document is cut into
2·CP chunks the same way, so every document length must be a multiple of 2·CP (pad documents to
that multiple). Positions restart at 0 in every document.
"""

import torch


def check_divisible(lengths, cp_size, what="sequence length"):
    for length in lengths:
        if length % (2 * cp_size):
            raise ValueError(
                f"{what} {length} is not a multiple of 2 x context-parallel size = {2 * cp_size}: the load-balanced "
                f"layout cuts it into {2 * cp_size} equal chunks. Pad it to a multiple of {2 * cp_size}.")


def zigzag_indices(doc_lengths, cp_size, cp_rank, device=None):
    """(indices, positions) of this rank's tokens: indices into the full (packed) sequence, positions
    within each document. doc_lengths: one length for a plain sequence, or each packed document's."""
    check_divisible(doc_lengths, cp_size, "document length" if len(doc_lengths) > 1 else "sequence length")
    indices, positions = [], []
    start = 0
    for length in doc_lengths:
        chunk = length // (2 * cp_size)
        for piece in (cp_rank, 2 * cp_size - 1 - cp_rank):
            local = torch.arange(piece * chunk, (piece + 1) * chunk, device=device)
            positions.append(local)
            indices.append(local + start)
        start += length
    return torch.cat(indices), torch.cat(positions)


def shard_sequence(x, doc_lengths, cp_size, cp_rank, dim=1):
    """This rank's part of x along dim (the sequence dim), in the zigzag layout."""
    indices, _ = zigzag_indices(doc_lengths, cp_size, cp_rank, x.device)
    return x.index_select(dim, indices)


def local_cu_seqlens(cu_seqlens, cp_size):
    """Document boundaries within one rank's shard: every document keeps 1/CP of its tokens."""
    return cu_seqlens // cp_size


def gathered_to_document_order(doc_lengths, cp_size, device=None):
    """A permutation that turns the rank-ordered concatenation of every rank's shard (what all-gather and
    all-to-all deliver) into whole documents, one after another: gathered[perm] is document-ordered."""
    local_lengths = [length // cp_size for length in doc_lengths]
    shard = sum(local_lengths)
    order = []
    offset = 0
    for local in local_lengths:
        for rank in range(cp_size):
            order.append(torch.arange(rank * shard + offset, rank * shard + offset + local, device=device))
        offset += local
    return torch.cat(order)
