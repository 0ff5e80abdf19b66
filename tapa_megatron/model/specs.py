"""GPT layer specs with TAPA (or a baseline's) core attention, built from Megatron-Core's own specs.

Megatron's spec builders give the LLaMA layer (RMSNorm, SwiGLU, fused QKV, no biases); we replace
one submodule, `self_attention.submodules.core_attention`, which is Megatron's extension point.
"""

import importlib.util

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)

from tapa_megatron.model.attention import SoftmaxCoreAttention, TapaCoreAttention

CORE_ATTENTION = {"tapa": TapaCoreAttention, "rope": SoftmaxCoreAttention, "none": SoftmaxCoreAttention}


def transformer_engine_available():
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def gpt_layer_spec(position="tapa", use_transformer_engine=None, megatron_attention=False):
    """The layer spec for `position` ("tapa", "rope" or "none").

    use_transformer_engine: None picks Transformer Engine's linears and norms when it is importable
    on a CUDA machine, Megatron's local modules otherwise (the CPU path).
    megatron_attention: keep the spec's own core attention (Transformer Engine's, with its context
    parallelism) for a baseline whose rotary embedding Megatron's GPTModel applies (see gpt.py).
    """
    if position not in CORE_ATTENTION:
        raise ValueError(f"position={position!r} is unknown; use one of {sorted(CORE_ATTENTION)}.")
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if megatron_attention and position == "tapa":
        raise ValueError("TAPA has no Megatron core attention; megatron_attention is for the RoPE and NoPE baselines.")
    if not megatron_attention:
        spec.submodules.self_attention.submodules.core_attention = CORE_ATTENTION[position]
    return spec
