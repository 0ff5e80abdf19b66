"""Which output rows of Megatron's fused linear_qkv make what: q / k amplitude and phase parts, v.

Megatron lays the linear_qkv output, per tensor-parallel partition, out by query group (attention.py,
get_query_key_value_tensors): [ng, np/ng + 2, hn] = each group's np/ng query heads, then its key head,
then its value head. TAPA's core attention splits every q and k head's hn dims into the first
A = theta * hn (amplitude) and the other hn - A (phase); RoPE / NoPE have no such split.
"""

import torch
from megatron.core import parallel_state
from megatron.core.transformer.attention import SelfAttention

from tapa_megatron.ops import amplitude_dim

QK_AMPLITUDE, QK_PHASE, V = "qk amplitude", "qk phase", "v"
QK = "qk"  # RoPE / NoPE: q and k rows, no amplitude / phase split


def qkv_row_groups(attention):
    """The group of every output row of one SelfAttention's linear_qkv (this partition's rows)."""
    config = attention.config
    heads, groups = attention.num_attention_heads_per_partition, attention.num_query_groups_per_partition
    head_dim = attention.hidden_size_per_attention_head
    if config.num_query_groups < parallel_state.get_tensor_model_parallel_world_size():
        raise ValueError("the q/k/v row split needs num_query_groups >= tensor parallel size (with fewer, Megatron "
                         "replicates key/value heads across ranks); lower parallel.tensor.")
    tapa = config.position_scheme == "tapa"
    amp = amplitude_dim(head_dim, config.tapa_theta) if tapa else head_dim
    q_or_k = [QK_AMPLITUDE if d < amp else QK_PHASE for d in range(head_dim)] if tapa else [QK] * head_dim
    per_group = q_or_k * (heads // groups + 1) + [V] * head_dim  # np/ng query heads, the key head, the value head
    return per_group * groups


@torch.no_grad()
def scale_phase_rows(model, factor):
    """Multiply the q and k phase rows of every layer's linear_qkv weight by factor (an init option)."""
    for module in model.modules():
        if isinstance(module, SelfAttention):
            phase = torch.tensor([group == QK_PHASE for group in qkv_row_groups(module)])
            module.linear_qkv.weight[phase] *= factor
