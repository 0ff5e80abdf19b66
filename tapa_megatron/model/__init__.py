"""Megatron-Core side of TAPA: core attention submodules, layer specs, model config and presets."""

from tapa_megatron.model.attention import SoftmaxCoreAttention, TapaCoreAttention, TapaTransformerConfig
from tapa_megatron.model.config import PRESETS, ModelConfig, RopeSettings, TapaSettings, transformer_config
from tapa_megatron.model.gpt import build_gpt_model
from tapa_megatron.model.specs import gpt_layer_spec

__all__ = ["ModelConfig", "PRESETS", "RopeSettings", "SoftmaxCoreAttention", "TapaCoreAttention", "TapaSettings",
           "TapaTransformerConfig", "build_gpt_model", "gpt_layer_spec", "transformer_config"]
