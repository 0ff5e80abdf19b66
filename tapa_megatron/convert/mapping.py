"""Parameter names and transforms between Hugging Face Llama and our Megatron GPTModel.

One table per direction. A row reads: these source parameters, through this transform, become
these target parameters; `{i}` is a decoder layer index. Megatron names are the GPTModel's own
state_dict names at TP = PP = 1 (the converters build that model; dist_checkpointing reshards it to
any layout). TapaLlama, the TAPA export, keeps LlamaForCausalLM's parameter names, so the same tables
serve both exports.

Layouts that differ:
- Megatron fuses q, k, v into one linear_qkv weight ordered by query group: for each of the G
  groups, its H/G query heads, then its key head, then its value head (head_dim rows each).
- Megatron's linear_fc1 is SwiGLU's [gate; up] stacked along the output dimension.
- Megatron pads the vocabulary (embedding and output rows) to a multiple of 128 x TP; the padding
  rows are zero on the way in and dropped on the way out.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


@dataclass(frozen=True)
class Dims:
    """The sizes the transforms need."""

    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # the real vocabulary (the HF side)
    padded_vocab_size: int  # Megatron's embedding rows

    @property
    def heads_per_group(self):
        return self.num_attention_heads // self.num_query_groups


def copy(tensors, dims):
    return tensors


def pad_vocab(tensors, dims):
    (weight,) = tensors
    padded = weight.new_zeros(dims.padded_vocab_size, weight.shape[1])
    padded[: weight.shape[0]] = weight
    return [padded]


def unpad_vocab(tensors, dims):
    (weight,) = tensors
    return [weight[: dims.vocab_size].clone()]


def fuse_qkv(tensors, dims):
    q, k, v = tensors
    groups, hidden = dims.num_query_groups, q.shape[1]
    per_group = (q.reshape(groups, -1, hidden), k.reshape(groups, -1, hidden), v.reshape(groups, -1, hidden))
    return [torch.cat(per_group, dim=1).reshape(-1, hidden)]


def split_qkv(tensors, dims):
    (qkv,) = tensors
    groups, hidden, d = dims.num_query_groups, qkv.shape[1], dims.head_dim
    q, k, v = qkv.reshape(groups, -1, hidden).split([dims.heads_per_group * d, d, d], dim=1)
    return [t.reshape(-1, hidden).clone() for t in (q, k, v)]


def fuse_gate_up(tensors, dims):
    gate, up = tensors
    return [torch.cat([gate, up], dim=0)]


def split_gate_up(tensors, dims):
    (fc1,) = tensors
    return [t.clone() for t in fc1.chunk(2, dim=0)]


class Rule(NamedTuple):
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    transform: Callable
    untied_only: bool = False  # the output layer: absent when it shares the embedding's weight


HF = "model.layers.{i}."
MC = "decoder.layers.{i}."

HF_TO_MEGATRON = (
    # Hugging Face Llama                                Megatron GPTModel                           transform
    Rule(("model.embed_tokens.weight",),                ("embedding.word_embeddings.weight",),      pad_vocab),
    Rule((HF + "input_layernorm.weight",),              (MC + "input_layernorm.weight",),           copy),
    Rule((HF + "self_attn.q_proj.weight",
          HF + "self_attn.k_proj.weight",
          HF + "self_attn.v_proj.weight"),              (MC + "self_attention.linear_qkv.weight",), fuse_qkv),
    Rule((HF + "self_attn.o_proj.weight",),             (MC + "self_attention.linear_proj.weight",),copy),
    Rule((HF + "post_attention_layernorm.weight",),     (MC + "pre_mlp_layernorm.weight",),         copy),
    Rule((HF + "mlp.gate_proj.weight",
          HF + "mlp.up_proj.weight"),                   (MC + "mlp.linear_fc1.weight",),            fuse_gate_up),
    Rule((HF + "mlp.down_proj.weight",),                (MC + "mlp.linear_fc2.weight",),            copy),
    Rule(("model.norm.weight",),                        ("decoder.final_layernorm.weight",),        copy),
    Rule(("lm_head.weight",),                           ("output_layer.weight",),                   pad_vocab, True),
)  # fmt: skip

MEGATRON_TO_HF = (
    # Megatron GPTModel                                 Hugging Face Llama                          transform
    Rule(("embedding.word_embeddings.weight",),         ("model.embed_tokens.weight",),             unpad_vocab),
    Rule((MC + "input_layernorm.weight",),              (HF + "input_layernorm.weight",),           copy),
    Rule((MC + "self_attention.linear_qkv.weight",),    (HF + "self_attn.q_proj.weight",
                                                         HF + "self_attn.k_proj.weight",
                                                         HF + "self_attn.v_proj.weight"),           split_qkv),
    Rule((MC + "self_attention.linear_proj.weight",),   (HF + "self_attn.o_proj.weight",),          copy),
    Rule((MC + "pre_mlp_layernorm.weight",),            (HF + "post_attention_layernorm.weight",),  copy),
    Rule((MC + "mlp.linear_fc1.weight",),               (HF + "mlp.gate_proj.weight",
                                                         HF + "mlp.up_proj.weight"),                split_gate_up),
    Rule((MC + "mlp.linear_fc2.weight",),               (HF + "mlp.down_proj.weight",),             copy),
    Rule(("decoder.final_layernorm.weight",),           ("model.norm.weight",),                     copy),
    Rule(("output_layer.weight",),                      ("lm_head.weight",),                        unpad_vocab, True),
)  # fmt: skip


def hf_shapes(dims, num_layers, tied):
    """Every HF Llama parameter name and its shape, in table order."""
    d, hidden = dims, dims.hidden_size
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (d.num_attention_heads * d.head_dim, hidden),
        "self_attn.k_proj.weight": (d.num_query_groups * d.head_dim, hidden),
        "self_attn.v_proj.weight": (d.num_query_groups * d.head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, d.num_attention_heads * d.head_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (d.ffn_hidden_size, hidden),
        "mlp.up_proj.weight": (d.ffn_hidden_size, hidden),
        "mlp.down_proj.weight": (hidden, d.ffn_hidden_size),
    }
    shapes = {"model.embed_tokens.weight": (d.vocab_size, hidden)}
    for i in range(num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (d.vocab_size, hidden)
    return shapes


def apply(rules, read, dims, num_layers, tied):
    """Run a table. read(name) returns a source tensor; yields (target name, tensor) one rule at a time,
    so at most one layer's parameters are in flight."""
    for rule in rules:
        if rule.untied_only and tied:
            continue
        per_layer = any("{i}" in name for name in rule.sources)
        for i in range(num_layers) if per_layer else [None]:
            sources = [name.format(i=i) for name in rule.sources]
            targets = [name.format(i=i) for name in rule.targets]
            yield from zip(targets, rule.transform([read(name) for name in sources], dims), strict=True)
