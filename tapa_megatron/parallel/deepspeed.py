"""TAPA under DeepSpeed-Ulysses: a local attention for `deepspeed.sequence.layer.DistributedAttention`.

DeepSpeed's DistributedAttention holds the sequence sharded over a process group (rank r holds the
r-th contiguous chunk), exchanges sequence for heads with an all-to-all, calls a local attention on
the whole sequence for its Hq/P heads, and exchanges back. What it gives the local attention is
q, k, v and, unchanged, whatever extra arguments its caller passed; it does not pass batch_dim_idx,
and it gathers nothing but q, k, v. So `TapaLocalAttention`

- is told the layout by its own batch_dim_idx (the value the caller passes DistributedAttention);
- knows every token's global position: by default the index in the gathered sequence (the chunks
  arrive in rank order, so index is position); given `position_ids` of this rank's tokens, it
  all-gathers them over the sequence group, as DeepSpeed's Hugging Face path (UlyssesSPAttentionHF)
  does for its attention backends;
- takes packed documents as `cu_seqlens` over the whole gathered sequence, the same tensor on every
  rank; documents may straddle rank boundaries.

This module does not import DeepSpeed; `distributed_tapa_attention` does, when called.
"""

import torch
import torch.distributed as dist

from tapa_megatron.ops import _check_options, tapa_attention, tapa_attention_varlen
from tapa_megatron.parallel.comm import gather_positions

__all__ = ["TapaLocalAttention", "distributed_tapa_attention"]


class TapaLocalAttention(torch.nn.Module):
    """TAPA attention on the whole sequence for this rank's heads, as DistributedAttention calls it.

    batch_dim_idx: 0 for (batch, seq, heads, head_dim) tensors, 1 for (seq, batch, heads, head_dim)
    (Megatron-DeepSpeed's layout); the same value the caller passes DistributedAttention.forward.
    sequence_process_group: the group DistributedAttention shards over; needed only to gather
    position_ids.
    The TAPA options (alpha, theta, phase, causal, backend) are those of `tapa_attention`.
    """

    def __init__(self, batch_dim_idx, sequence_process_group=None, *, alpha=0.1, theta=0.5, phase="quadratic",
                 causal=True, backend="auto"):
        super().__init__()
        if batch_dim_idx not in (0, 1):
            raise ValueError(f"batch_dim_idx={batch_dim_idx!r}: use 0 for (batch, seq, heads, head_dim) tensors or "
                             "1 for (seq, batch, heads, head_dim), the value passed to DistributedAttention.forward.")
        _check_options(alpha, phase, backend)
        self.batch_dim_idx = batch_dim_idx
        self.group = sequence_process_group
        self.options = dict(alpha=alpha, theta=theta, phase=phase, causal=causal, backend=backend)

    def forward(self, query, key, value, position_ids=None, cu_seqlens=None, max_seqlen=None):
        """query (B, S, Hq/P, D) or (S, B, Hq/P, D) after DeepSpeed's all-to-all, key/value likewise
        with Hkv/P heads. position_ids: this rank's tokens' positions, (S/P,) or (B, S/P), before the
        exchange. cu_seqlens: packed documents' boundaries over all S tokens (batch must be 1);
        positions then restart in every document unless position_ids say otherwise."""
        if query.dim() != 4:
            raise ValueError(f"query has shape {tuple(query.shape)}; DistributedAttention passes 4-dim tensors "
                             "(batch, seq, heads, head_dim) or (seq, batch, heads, head_dim).")
        if self.batch_dim_idx == 1:  # the op takes (B, S, H, D)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, seq = query.shape[:2]
        positions = None if position_ids is None else self._gather(position_ids, batch, seq)
        if cu_seqlens is None:
            out = tapa_attention(query, key, value, q_pos=positions, k_pos=positions, **self.options)
        else:
            if batch != 1:
                raise ValueError(f"cu_seqlens (packed documents) needs batch 1, got batch {batch}: pack the batch's "
                                 "documents into one sequence.")
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            positions = None if positions is None else positions[0]
            out = tapa_attention_varlen(query[0], key[0], value[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                        q_pos=positions, k_pos=positions, **self.options)[None]
        return out.transpose(0, 1) if self.batch_dim_idx == 1 else out

    def _gather(self, position_ids, batch, seq):
        """The gathered sequence's positions (B, S) from this rank's (S/P,) or (B, S/P)."""
        if self.group is None:
            raise ValueError("position_ids are this rank's tokens' positions and DeepSpeed passes them on ungathered: "
                             "give TapaLocalAttention the sequence_process_group so it can gather them.")
        world = dist.get_world_size(self.group)
        local = seq // world
        if position_ids.shape not in ((local,), (batch, local)):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected this rank's ({local},) or "
                             f"({batch}, {local}) token positions (sequence {seq} over {world} ranks).")
        return gather_positions(position_ids.expand(batch, local), self.group)


def distributed_tapa_attention(sequence_process_group, batch_dim_idx, **options):
    """DeepSpeed's DistributedAttention around a TapaLocalAttention, its all-to-all dims set for the
    layout (heads scattered, the sequence dim gathered). Call it as DistributedAttention:
    attn(q, k, v, batch_dim_idx, position_ids=..., cu_seqlens=...) with this rank's shards."""
    try:
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError as err:
        raise ImportError("DeepSpeed is not installed: pip install 'tapa-megatron[deepspeed]'.") from err
    local = TapaLocalAttention(batch_dim_idx, sequence_process_group, **options)
    return DistributedAttention(local, sequence_process_group, scatter_idx=2, gather_idx=1 - batch_dim_idx)
