"""TapaLlama for transformers: the Llama architecture with TAPA attention in place of RoPE.

Self-contained (PyTorch + transformers, nothing from tapa-megatron): `tapa convert megatron-to-hf`
copies this file and configuration_tapa_llama.py into the exported directory, which then loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Parameter names are
LlamaForCausalLM's.

TAPA scores a query at position m against a key at position n as

    s(m, n) = (q_A . k_A) / sqrt(A) * cos(2 pi |m - n|^alpha (q_P . k_P) / sqrt(P))

where each head's q and k split into an amplitude part (the first A = theta * head_dim dims) and a
phase part (the other P dims). Scores depend on the distance |m - n|, so the KV cache (TapaCache)
stores every cached key's position beside its key and value, and a key is visible to a query when
its position is <= the query's. (2 pi is tapa_phase_scale, the paper's; a model trained with another
scale carries it in its config.)
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_tapa_llama import TapaLlamaConfig

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def tapa_attention(query, key, value, query_positions, key_positions, key_mask=None, *, alpha, amplitude_dim,
                   phase="quadratic", phase_scale=2 * math.pi, query_block=1024):
    """TAPA attention, causal by positions, one block of queries at a time.

    query (B, H, Sq, D); key, value (B, G, Sk, D) with H a multiple of G (grouped-query attention);
    positions int64 (B, Sq) and (B, Sk); key_mask (B, Sk) bool, False for padding keys, or None.
    Scores and softmax run in float32 (float64 for float64 inputs). A query that sees no key gets a zero
    output.
    """
    compute = torch.promote_types(query.dtype, torch.float32)
    heads, groups = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // groups, dim=1).to(compute)
    value = value.repeat_interleave(heads // groups, dim=1).to(compute)
    phase_dim = query.shape[-1] - amplitude_dim
    key_amplitude, key_phase = key[..., :amplitude_dim], key[..., amplitude_dim:]
    outputs = []
    for start in range(0, query.shape[2], query_block):
        q = query[:, :, start : start + query_block].to(compute)
        q_positions = query_positions[:, start : start + query_block]
        amplitude = q[..., :amplitude_dim] @ key_amplitude.transpose(-1, -2) / math.sqrt(amplitude_dim)
        if phase == "quadratic":
            phi = q[..., amplitude_dim:] @ key_phase.transpose(-1, -2) / math.sqrt(phase_dim)
        else:  # linear: phi = (sum q_P + sum k_P) / sqrt(P)
            phi = (q[..., amplitude_dim:].sum(-1)[..., :, None] + key_phase.sum(-1)[..., None, :])
            phi = phi / math.sqrt(phase_dim)
        distance = (q_positions[:, :, None] - key_positions[:, None, :]).abs().to(compute)  # (B, sq, Sk)
        distance_power = torch.where(distance > 0, distance.pow(alpha), torch.zeros_like(distance))
        scores = amplitude * torch.cos(phase_scale * distance_power[:, None] * phi)
        visible = key_positions[:, None, :] <= q_positions[:, :, None]
        if key_mask is not None:
            visible = visible & key_mask[:, None, :]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        # softmax that gives 0 (not NaN) for a row without visible keys: NaN would reach the values
        # computed from that row in the next layer and, through 0 * NaN, every other row.
        row_max = scores.amax(dim=-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        outputs.append(weights @ value)
    return torch.cat(outputs, dim=2).to(query.dtype)


class TapaCacheLayer(DynamicLayer):
    """One layer's keys and values, plus the position of every cached key: (batch, seq) int64."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.positions = None

    def append_positions(self, positions):
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=-1)
        return self.positions

    def reset(self):
        super().reset()
        self.positions = None

    def crop(self, *args, **kwargs):
        super().crop(*args, **kwargs)
        if self.positions is not None:
            self.positions = self.positions[:, : self.get_seq_length()]

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices, ...]


class TapaCache(DynamicCache):
    """A DynamicCache whose layers also keep their keys' positions (TapaCacheLayer).

    TapaLlama swaps an empty cache of another kind (generate() makes a DynamicCache) for one of these
    on its first forward and returns it; a non-empty cache of another kind is refused, since the
    positions of its keys are unknown.
    """

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = TapaCacheLayer  # layers are created on first update

    def update_with_positions(self, key_states, value_states, positions, layer_idx):
        """Append one layer's new keys, values and their positions; return all of them."""
        keys, values = self.update(key_states, value_states, layer_idx)
        return keys, values, self.layers[layer_idx].append_positions(positions)

    def next_positions(self, length):
        """Positions for `length` new tokens that continue each row: (batch, length)."""
        last = self.layers[0].positions[:, -1:]
        return last + 1 + torch.arange(length, device=last.device)


class TapaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(dtype)


class TapaLlamaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, positions, key_mask, cache):
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        key_positions = positions
        if cache is not None:
            key, value, key_positions = cache.update_with_positions(key, value, positions, self.layer_idx)
        c = self.config
        out = tapa_attention(query, key, value, positions, key_positions, key_mask, alpha=c.tapa_alpha,
                             amplitude_dim=c.tapa_amplitude_dim, phase=c.tapa_phase,
                             phase_scale=getattr(c, "tapa_phase_scale", 2 * math.pi), query_block=c.tapa_query_block)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class TapaLlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TapaLlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = TapaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TapaLlamaAttention(config, layer_idx)
        self.post_attention_layernorm = TapaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TapaLlamaMLP(config)

    def forward(self, hidden_states, positions, key_mask, cache):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), positions, key_mask, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TapaLlamaPreTrainedModel(PreTrainedModel):
    config_class = TapaLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["TapaLlamaDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TapaRMSNorm):
            nn.init.ones_(module.weight)


class TapaLlamaModel(TapaLlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TapaLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = TapaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs):
        """attention_mask: (batch, cached + new tokens), 0 for padding. position_ids: (batch, new) or
        (new,); default: each row continues from its last cached position (from 0 without a cache)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden_states.shape[:2]
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = _tapa_cache(cache) if use_cache else None
        cached = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (cache.next_positions(length) if cached else
                            torch.arange(length, device=hidden_states.device).expand(batch, length))
        positions = position_ids.to(hidden_states.device).long().expand(batch, length)
        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, cached + length):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; TapaLlama takes a 2-D "
                                 f"padding mask (batch, cached + new tokens) = ({batch}, {cached + length}).")
            key_mask = attention_mask.bool()
        for layer in self.layers:
            hidden_states = layer(hidden_states, positions, key_mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_FIELD: cache})


def _tapa_cache(cache):
    if cache is None or isinstance(cache, TapaCache):
        return cache if cache is not None else TapaCache()
    if cache.get_seq_length() == 0:
        return TapaCache()
    raise ValueError(f"TapaLlama was handed a filled {type(cache).__name__}: TAPA needs every cached key's "
                     "position, which only TapaCache keeps. Start from no cache (or an empty one) and pass back "
                     "the cache the model returns.")


class TapaLlamaForCausalLM(TapaLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = TapaLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        """labels: token ids (-100 to ignore), shifted inside. logits_to_keep: N > 0 keeps the last N
        positions' logits (generate() asks for 1)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache)
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})


def register_auto_classes():
    """Make AutoConfig / AutoModelForCausalLM resolve model_type "tapa_llama" to these classes in this
    process (the alternative to trust_remote_code when this file is importable)."""
    AutoConfig.register(TapaLlamaConfig.model_type, TapaLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(TapaLlamaConfig, TapaLlamaForCausalLM, exist_ok=True)
