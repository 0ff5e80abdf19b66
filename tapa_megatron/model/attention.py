"""Core-attention submodules for Megatron-Core's SelfAttention: TAPA, and causal softmax attention for
the baselines (RoPE, PI, YaRN, and NoPE: no positional signal at all).

Both plug into the GPT layer spec as `core_attention` (see specs.py) with the model's
position_embedding_type = "none": position information enters here, from token positions, so TAPA
and its baselines differ in one submodule and nothing else.

Megatron hands core attention q [sq, b, heads, D] and k, v [sk, b, groups, D] (or [t, heads, D]
for packed 'thd' batches) and expects [sq, b, heads * D] back.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from tapa_megatron.model.rope import apply_rope, rope_inverse_frequencies, yarn_attention_scale
from tapa_megatron.ops import amplitude_dim, tapa_attention, tapa_attention_varlen
from tapa_megatron.ops.reference import tapa_scores
from tapa_megatron.parallel import COMMS, context_parallel_attention, layout


@dataclass
class TapaTransformerConfig(TransformerConfig):
    """Megatron's TransformerConfig plus the position scheme's settings (saved with checkpoints)."""

    position_scheme: str = "tapa"  # "tapa", "rope" or "none" (NoPE)
    tapa_alpha: float = 0.1
    tapa_theta: float = 0.5
    tapa_phase: str = "quadratic"
    tapa_phase_scale: float = 2 * math.pi  # the angle's factor; the ops compute 2 pi, scale_phase rescales
    tapa_backend: str = "auto"
    rope_base: float = 500000.0
    rope_scaling: str = "none"  # "none", "pi", "yarn"
    rope_scaling_factor: float = 1.0
    rope_original_max_position: int = 8192
    # YaRN as Megatron's YarnRotaryEmbedding reads it (GPTModel takes these from the config), the
    # same maths as rope.py: a ramp between beta_fast and beta_slow, temperature 0.1 ln(s) + 1.
    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 8192
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True


def _check_causal(attn_mask_type):
    if attn_mask_type != AttnMaskType.causal:
        raise ValueError(f"{attn_mask_type} is not supported: TAPA GPT layers use causal attention.")


def _refuse_mask(attention_mask):
    if attention_mask is not None:
        raise ValueError(
            "TAPA/RoPE core attention takes its causal mask from token positions and ignores dense masks; "
            "build batches without attention_mask (GPTDatasetConfig(create_attention_mask=False)) and pack "
            "documents with packed_seq_params instead."
        )


def _packed_layout(packed_seq_params):
    """cu_seqlens and max lengths of a 'thd' batch (padded boundaries when given)."""
    p = packed_seq_params
    cu_q = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
    cu_k = p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else p.cu_seqlens_kv
    return cu_q, cu_k, int(p.max_seqlen_q), int(p.max_seqlen_kv)


def scale_phase(query, key, phase_scale, amp_dim, phase):
    """q, k (..., D) with the phase parts rescaled so that ops computing cos(2 pi |m-n|^alpha phi) compute
    cos(phase_scale |m-n|^alpha phi): phi is bilinear in (q_P, k_P) for the quadratic phase, so q_P alone is
    scaled; the linear phase sums q_P and k_P, so both are. The kernels stay as the paper writes them."""
    factor = phase_scale / (2 * math.pi)
    if factor == 1.0:
        return query, key
    def scaled(x):
        return torch.cat([x[..., :amp_dim], x[..., amp_dim:] * factor], dim=-1)
    return scaled(query), (scaled(key) if phase == "linear" else key)


class TapaCoreAttention(MegatronModule):
    """TAPA attention as a Megatron core-attention module: no parameters, causal by positions.

    With context parallelism the sequence arrives sharded in Megatron's load-balanced layout and
    attention runs across the context-parallel group with the layer's cp_comm_type."""

    def __init__(self, config: TapaTransformerConfig, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        _check_causal(attn_mask_type)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("attention_dropout > 0 is not supported by TAPA core attention; set it to 0.")
        self.options = dict(alpha=config.tapa_alpha, theta=config.tapa_theta, phase=config.tapa_phase,
                            backend=config.tapa_backend)
        self.phase_scale = config.tapa_phase_scale
        self.amp_dim = amplitude_dim(config.kv_channels, config.tapa_theta)
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_comm_type = cp_comm_type or "p2p"
            if self.cp_comm_type not in COMMS:
                raise ValueError(f"cp_comm_type={self.cp_comm_type!r} is not supported by TAPA; use one of {COMMS}.")
            self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        _refuse_mask(attention_mask)
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by TAPA core attention.")
        query, key = scale_phase(query, key, self.phase_scale, self.amp_dim, self.options["phase"])
        if self.cp_group is not None:
            return self._context_parallel(query, key, value, packed_seq_params)
        if packed_seq_params is not None:
            cu_q, cu_k, max_q, max_k = _packed_layout(packed_seq_params)
            out = tapa_attention_varlen(query, key, value, cu_q, cu_k, max_q, max_k, causal=True, **self.options)
            return out.reshape(out.shape[0], -1)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [s, b, h, D] -> [b, s, h, D]
        out = tapa_attention(q, k, v, causal=True, **self.options)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)

    def pair_scores(self, q, k, q_pos, k_pos):
        """Pre-softmax TAPA scores of N (query, key) pairs: q, k (N, D) head vectors, positions (N,)."""
        q, k = scale_phase(q.double(), k.double(), self.phase_scale, self.amp_dim, self.options["phase"])
        scores = tapa_scores(q[:, None, None], k[:, None, None], q_pos[:, None], k_pos[:, None],
                             alpha=self.options["alpha"], amp_dim=self.amp_dim, phase=self.options["phase"])
        return scores.reshape(-1)

    def _context_parallel(self, query, key, value, packed_seq_params):
        options = dict(cp_group=self.cp_group, comm=self.cp_comm_type, **self.options)
        if packed_seq_params is not None:  # global document boundaries, every document a multiple of 2*CP
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = cu if cu is not None else packed_seq_params.cu_seqlens_q
            out = context_parallel_attention(query, key, value, cu_seqlens=cu, **options)
            return out.reshape(out.shape[0], -1)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        out = context_parallel_attention(q, k, v, **options)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)


class SoftmaxCoreAttention(MegatronModule):
    """Causal softmax attention for the baselines: with position_scheme "rope", RoPE (plain, PI or YaRN)
    rotates q and k by their positions; with "none" (NoPE) nothing does, and the causal mask is the
    model's only source of order. With context parallelism it runs TAPA's schemes with the softmax score."""

    def __init__(self, config: TapaTransformerConfig, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        _check_causal(attn_mask_type)
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_comm_type = cp_comm_type or "p2p"
            if self.cp_comm_type not in COMMS:
                raise ValueError(f"cp_comm_type={self.cp_comm_type!r} is not supported; use one of {COMMS}.")
            if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
                raise ValueError("attention_dropout > 0 is not supported with context parallelism; set it to 0.")
            self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
        self.rotary = config.position_scheme == "rope"
        if self.rotary:
            self.register_buffer(
                "inv_freq",
                rope_inverse_frequencies(config.kv_channels, config.rope_base, config.rope_scaling,
                                         config.rope_scaling_factor, config.rope_original_max_position),
                persistent=False,
            )
            self.qk_scale = yarn_attention_scale(config.rope_scaling, config.rope_scaling_factor)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _rotate(self, x, positions):
        """x (B, S, H, D) rotated by positions (B, S) under RoPE; unchanged under NoPE."""
        if not self.rotary:
            return x
        return apply_rope(x, positions, self.inv_freq.to(torch.promote_types(x.dtype, torch.float32)), self.qk_scale)

    def pair_scores(self, q, k, q_pos, k_pos):
        """Pre-softmax scores q_rot . k_rot / sqrt(D) of N (query, key) pairs: q, k (N, D), positions (N,)."""
        q_rot = self._rotate(q[:, None, None].double(), q_pos[:, None])
        k_rot = self._rotate(k[:, None, None].double(), k_pos[:, None])
        scale = self.softmax_scale or q.shape[-1] ** -0.5
        return (q_rot * k_rot).sum(-1).reshape(-1) * scale

    def _attend(self, q, k, v):
        """q (b, s, h, D), k/v (b, s, g, D), positions arange: causal SDPA with GQA."""
        positions = torch.arange(q.shape[1], device=q.device).expand(q.shape[0], -1)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        _refuse_mask(attention_mask)
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the baselines' core attention.")
        if self.cp_group is not None:
            return self._context_parallel(query, key, value, packed_seq_params)
        if packed_seq_params is not None:  # one document at a time, positions restarting at 0
            cu_q, cu_k, _, _ = _packed_layout(packed_seq_params)
            bounds = zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])
            out = torch.cat([self._attend(query[None, q0:q1], key[None, k0:k1], value[None, k0:k1])[0]
                             for q0, q1, k0, k1 in bounds])
            return out.reshape(out.shape[0], -1)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        out = self._attend(q, k, v)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)

    def _context_parallel(self, query, key, value, packed_seq_params):
        """The shard arrives in the load-balanced layout: RoPE rotates q and k by their GLOBAL positions
        (those the layout gives this rank), then the softmax score runs over the context-parallel group."""
        cp_size, cp_rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        options = dict(cp_group=self.cp_group, comm=self.cp_comm_type, score="softmax", scale=self.softmax_scale)
        if packed_seq_params is not None:  # global document boundaries, every document a multiple of 2*CP
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = cu if cu is not None else packed_seq_params.cu_seqlens_q
            _, positions = layout.zigzag_indices((cu[1:] - cu[:-1]).tolist(), cp_size, cp_rank, query.device)
            q, k = (self._rotate(t[None], positions[None])[0] for t in (query, key))
            out = context_parallel_attention(q, k, value, cu_seqlens=cu, **options)
            return out.reshape(out.shape[0], -1)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        _, positions = layout.zigzag_indices([q.shape[1] * cp_size], cp_size, cp_rank, q.device)
        positions = positions.expand(q.shape[0], -1)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        out = context_parallel_attention(q, k, v, **options)  # the mask follows from the layout, as for TAPA
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)
