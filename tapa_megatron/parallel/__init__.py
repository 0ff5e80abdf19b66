"""Context parallelism for TAPA: the sequence is sharded over a process group and attention is
computed across shards. Three schemes, one entry point:

    p2p         ring: key/value blocks circulate, partial (out, lse) merge exactly (ring.py)
    all_gather  every rank gathers all keys/values, attends its own queries
    a2a         Ulysses: all-to-all sequence <-> heads, the single-device op on whole sequences, back

The schemes know the op only through its (out, lse) contract, and positions say where every token
sits, so the zigzag (load-balanced) layout needs no position messages. The score is a choice:
"tapa", or "softmax" (plain q.k, ops/softmax.py) for the RoPE and NoPE baselines, whose RoPE has
rotated q and k by their global positions before they get here. Nothing here knows Megatron.
"""

import torch
import torch.distributed as dist

from tapa_megatron.ops import (
    tapa_attention,
    tapa_attention_backward,
    tapa_attention_varlen,
    tapa_attention_varlen_backward,
)
from tapa_megatron.ops.softmax import (
    softmax_attention,
    softmax_attention_backward,
    softmax_attention_varlen,
    softmax_attention_varlen_backward,
)
from tapa_megatron.parallel import layout
from tapa_megatron.parallel.comm import gather_positions, gather_sequence, heads_to_sequence, sequence_to_heads
from tapa_megatron.parallel.ring import ring_attention

COMMS = ("p2p", "all_gather", "a2a")
# score -> (forward, backward, packed forward, packed backward), all with the (out, lse) contract
OPS = {
    "tapa": (tapa_attention, tapa_attention_backward, tapa_attention_varlen, tapa_attention_varlen_backward),
    "softmax": (softmax_attention, softmax_attention_backward, softmax_attention_varlen,
                softmax_attention_varlen_backward),
}

__all__ = ["COMMS", "OPS", "context_parallel_attention", "layout"]


def _validate(q, k, comm, score, cp_size, cu_seqlens):
    if score not in OPS:
        raise ValueError(f"score={score!r} is unknown; use one of {tuple(OPS)}.")
    if comm not in COMMS:
        raise ValueError(f"comm={comm!r} is unknown; use one of {COMMS}.")
    packed = cu_seqlens is not None
    if q.dim() != (3 if packed else 4):
        raise ValueError(f"q has shape {tuple(q.shape)}; expected (batch, seq, heads, D) or, with cu_seqlens, "
                         "(tokens, heads, D).")
    if q.shape[-3] != k.shape[-3]:
        raise ValueError(f"q holds {q.shape[-3]} local tokens but k holds {k.shape[-3]}: context-parallel attention "
                         "is self-attention over one sharded sequence.")
    if comm == "a2a":
        heads_q, heads_kv = q.shape[-2], k.shape[-2]
        if heads_q % cp_size:
            raise ValueError(f"comm='a2a' splits heads over ranks: {heads_q} query heads are not divisible by the "
                             f"context-parallel size {cp_size}. Use comm='p2p' or 'all_gather', or a CP size that "
                             f"divides the heads.")
        if heads_kv % cp_size and cp_size % heads_kv:
            raise ValueError(f"comm='a2a': {heads_kv} key/value heads neither divide nor are divided by the "
                             f"context-parallel size {cp_size}.")


def _zigzag_positions(doc_lengths, group, device):
    _, positions = layout.zigzag_indices(doc_lengths, dist.get_world_size(group), dist.get_rank(group), device)
    return positions


def _batched_partials(ops, options):
    attention, attention_backward = ops[0], ops[1]

    def partial_forward(q, k, v, q_pos, k_pos, causal):
        return attention(q, k, v, q_pos=q_pos, k_pos=k_pos, causal=causal, return_lse=True, **options)

    def partial_backward(d_out, d_lse, q, k, v, out, lse, q_pos, k_pos, causal):
        return attention_backward(d_out, q, k, v, out, lse, d_lse=d_lse, q_pos=q_pos, k_pos=k_pos, causal=causal,
                                  **options)

    return partial_forward, partial_backward


def _packed_partials(ops, cu_local, max_local, options):
    """The packed op as batch-of-one functions for the ring (every rank's shard has the same documents)."""
    attention_varlen, attention_varlen_backward = ops[2], ops[3]

    def partial_forward(q, k, v, q_pos, k_pos, causal):
        out, lse = attention_varlen(q[0], k[0], v[0], cu_local, cu_local, max_local, max_local, q_pos=q_pos[0],
                                         k_pos=k_pos[0], causal=causal, return_lse=True, **options)
        return out[None], lse[None]

    def partial_backward(d_out, d_lse, q, k, v, out, lse, q_pos, k_pos, causal):
        grads = attention_varlen_backward(d_out[0], q[0], k[0], v[0], out[0], lse[0], cu_local, cu_local, max_local,
                                          max_local, d_lse=None if d_lse is None else d_lse[0], q_pos=q_pos[0],
                                          k_pos=k_pos[0], causal=causal, **options)
        return [g[None] for g in grads]

    return partial_forward, partial_backward


def _expand_kv_heads_for(k, v, cp_size):
    """a2a gives each rank heads/CP key/value heads; with fewer kv heads than ranks, repeat them so each
    rank gets the one its query heads use."""
    heads_kv = k.shape[-2]
    if heads_kv % cp_size == 0:
        return k, v
    repeat = cp_size // heads_kv
    return k.repeat_interleave(repeat, dim=-2), v.repeat_interleave(repeat, dim=-2)


def context_parallel_attention(q, k, v, *, cp_group, comm="p2p", q_pos=None, k_pos=None, cu_seqlens=None,
                               return_lse=False, score="tapa", **options):
    """Causal attention (score "tapa", or "softmax" for the baselines) of this rank's shard of a sequence
    sharded over cp_group. options go to the score's op: alpha, theta, phase, backend for TAPA
    (`tapa_attention`), scale for softmax (`softmax_attention`).

    q: (B, S/CP, Hq, D), k, v: (B, S/CP, Hkv, D): this rank's tokens. With positions None the shards are
    in the load-balanced layout (`layout.zigzag_indices`; Megatron's get_batch_on_this_cp_rank), else
    q_pos / k_pos give every local token's global position ((S/CP,) or (B, S/CP)).
    Packed documents: cu_seqlens holds the GLOBAL document boundaries (each document a multiple of 2·CP
    long), q (T/CP, Hq, D) is this rank's zigzag shard, and positions restart in every document.
    Returns this rank's output (and with return_lse its lse, (B, Hq, S/CP) or (Hq, T/CP); p2p only).
    """
    cp_size = dist.get_world_size(cp_group)
    _validate(q, k, comm, score, cp_size, cu_seqlens)
    if return_lse and comm != "p2p":
        raise ValueError("return_lse is available with comm='p2p' (the other schemes do not merge partials).")
    ops = OPS[score]
    attention, attention_varlen = ops[0], ops[2]
    packed = cu_seqlens is not None
    if packed:
        doc_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        layout.check_divisible(doc_lengths, cp_size, "document length")
        q, k, v = q[None], k[None], v[None]
    else:
        doc_lengths = [q.shape[1] * cp_size]
        layout.check_divisible(doc_lengths, cp_size)
    zigzag = q_pos is None and k_pos is None
    if zigzag:
        q_pos = k_pos = _zigzag_positions(doc_lengths, cp_group, q.device).expand(q.shape[0], -1)
    else:
        q_pos = q_pos.expand(q.shape[0], -1) if q_pos.dim() == 1 else q_pos
        k_pos = k_pos.expand(k.shape[0], -1) if k_pos.dim() == 1 else k_pos

    if comm == "p2p":
        if packed:
            cu_local = layout.local_cu_seqlens(cu_seqlens, cp_size)
            partials = _packed_partials(ops, cu_local, max(doc_lengths) // cp_size, options)
        else:
            partials = _batched_partials(ops, options)
        positions_of = None
        if zigzag and not packed:  # every rank's positions follow from the layout: none travel
            def positions_of(rank):
                _, positions = layout.zigzag_indices(doc_lengths, cp_size, rank, q.device)
                return positions.expand(q.shape[0], -1)
        out, lse = ring_attention(q, k, v, q_pos, k_pos, cp_group, positions_of, *partials)
        if packed:
            out, lse = out[0], lse[0]
        return (out, lse) if return_lse else out

    if comm == "all_gather":
        k_all, v_all = gather_sequence(k, cp_group), gather_sequence(v, cp_group)
        k_pos_all = gather_positions(k_pos, cp_group)
        if not packed:
            return attention(q, k_all, v_all, q_pos=q_pos, k_pos=k_pos_all, causal=True, **options)
        order = layout.gathered_to_document_order(doc_lengths, cp_size, q.device)
        local_cu = layout.local_cu_seqlens(cu_seqlens, cp_size)
        return attention_varlen(q[0], k_all[0, order], v_all[0, order], local_cu, cu_seqlens,
                                max(doc_lengths) // cp_size, max(doc_lengths), q_pos=q_pos[0],
                                k_pos=k_pos_all[0, order], causal=True, **options)

    # a2a (Ulysses): whole sequences, heads split over ranks; positions say where each token sits.
    k, v = _expand_kv_heads_for(k, v, cp_size)
    q_heads, k_heads, v_heads = (sequence_to_heads(t, cp_group) for t in (q, k, v))
    q_pos_all, k_pos_all = gather_positions(q_pos, cp_group), gather_positions(k_pos, cp_group)
    if not packed:
        out = attention(q_heads, k_heads, v_heads, q_pos=q_pos_all, k_pos=k_pos_all, causal=True, **options)
        return heads_to_sequence(out, cp_group)
    order = layout.gathered_to_document_order(doc_lengths, cp_size, q.device)
    out = torch.empty_like(q_heads[0])
    out_docs = attention_varlen(q_heads[0, order], k_heads[0, order], v_heads[0, order], cu_seqlens, cu_seqlens,
                                max(doc_lengths), max(doc_lengths), q_pos=q_pos_all[0, order],
                                k_pos=k_pos_all[0, order], causal=True, **options)
    out = out.index_copy(0, order, out_docs)  # back to the gathered (rank) order
    return heads_to_sequence(out[None], cp_group)[0]
