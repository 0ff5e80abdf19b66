"""The model section of a recipe: a LLaMA-3-style shape (from a preset or explicit), and the position
scheme (TAPA, or a RoPE / NoPE baseline). `transformer_config` turns it into Megatron's TransformerConfig."""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tapa_megatron.model.attention import TapaTransformerConfig
from tapa_megatron.model.rope import SCALINGS
from tapa_megatron.ops import BACKENDS, PHASES, amplitude_dim

# LLaMA-3 shapes: (layers, hidden, heads, kv heads, ffn). 8B is the paper's 7B-class model.
PRESETS = {
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=384),
    "1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=8192),
    "8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=14336),
    "70b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=28672),
}
POSITIONS = ("tapa", "rope", "none")  # none: NoPE, the no-positional-signal control


@dataclass
class TapaSettings:
    alpha: float = 0.1
    theta: float = 0.5
    phase: str = "quadratic"
    # the angle is phase_scale * |m - n|^alpha * phi: 2 pi as the paper writes it; a public forward-only
    # TAPA kernel uses 1. Applied by scaling q_P (and k_P for the linear phase) before the op.
    phase_scale: float = 2 * math.pi
    # the q/k phase projections' initial weights times this (1: Megatron's init, as in the paper);
    # read at build only, so checkpoints and conversion are unaffected
    phase_init_scale: float = 1.0
    backend: str = "auto"  # "auto": Triton kernels on CUDA, the block-wise torch path on CPU


@dataclass
class RopeSettings:
    base: float = 500000.0
    scaling: str = "none"  # "none", "pi" (position interpolation) or "yarn"
    factor: float = 1.0  # PI / YaRN context scale factor
    original_max_position: int = 8192  # the context the RoPE model was trained at


@dataclass
class ModelConfig:
    preset: str = "tiny"
    num_layers: int | None = None  # None: the preset's value
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None  # None: the tokenizer's
    tie_embeddings: bool = False
    norm_epsilon: float = 1e-5
    init_std: float = 0.02
    position: str = "tapa"  # "tapa", "rope" or "none" (NoPE)
    tapa: TapaSettings = field(default_factory=TapaSettings)
    rope: RopeSettings = field(default_factory=RopeSettings)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r} is unknown; use one of {sorted(PRESETS)}.")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def validate(self):
        if self.position not in POSITIONS:
            raise ValueError(f"model.position={self.position!r} is unknown; use one of {POSITIONS}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_query_groups={self.num_query_groups}.")
        if self.tapa.phase not in PHASES:
            raise ValueError(f"model.tapa.phase={self.tapa.phase!r} is unknown; use one of {PHASES}.")
        if self.tapa.backend not in BACKENDS:
            raise ValueError(f"model.tapa.backend={self.tapa.backend!r} is unknown; use one of {BACKENDS}.")
        if not self.tapa.alpha > 0:
            raise ValueError(f"model.tapa.alpha={self.tapa.alpha} must be > 0.")
        if not (math.isfinite(self.tapa.phase_scale) and self.tapa.phase_scale > 0):
            raise ValueError(f"model.tapa.phase_scale={self.tapa.phase_scale} must be a finite number > 0 "
                             "(the paper's is 2 pi = 6.283185307179586).")
        if not (math.isfinite(self.tapa.phase_init_scale) and self.tapa.phase_init_scale > 0):
            raise ValueError(f"model.tapa.phase_init_scale={self.tapa.phase_init_scale} must be a finite number > 0 "
                             "(1 keeps Megatron's init).")
        if self.position == "tapa":
            amplitude_dim(self.head_dim, self.tapa.theta)  # raises for a theta that does not split D
        if self.rope.scaling not in SCALINGS:
            raise ValueError(f"model.rope.scaling={self.rope.scaling!r} is unknown; use one of {SCALINGS}.")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, vocab_size):
        """Parameter count (embeddings included), for logs and MFU."""
        kv = self.num_query_groups * self.head_dim
        attention = self.hidden_size * (self.hidden_size + 2 * kv) + self.hidden_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.ffn_hidden_size
        layer = attention + mlp + 2 * self.hidden_size
        embeddings = vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embeddings + self.hidden_size


def transformer_config(model: ModelConfig, *, tensor_parallel=1, pipeline_parallel=1, context_parallel=1,
                       cp_comm_type="p2p", sequence_parallel=False, params_dtype=torch.float32, bf16=False,
                       recompute=None, use_cpu_initialization=True):
    """Megatron's TransformerConfig for this model and parallel layout.

    recompute: None, "full" (whole layers) or "selective" (core attention only).
    """
    recompute_options = {}
    if recompute == "full":
        recompute_options = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        # TAPA's kernels keep only out and lse and recompute the scores in their backward already, so
        # recomputing core_attn would rerun TAPA's forward (and the context-parallel ring) for nothing;
        # the MLP's activations are what is left to drop. RoPE / NoPE's local attention keeps its scores.
        modules = ["mlp"] if model.position == "tapa" else ["core_attn"]
        recompute_options = dict(recompute_granularity="selective", recompute_modules=modules)
    elif recompute is not None:
        raise ValueError(f"recompute={recompute!r} is unknown; use null, 'full' or 'selective'.")
    return TapaTransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        init_method_std=model.init_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        cp_comm_type=cp_comm_type if context_parallel > 1 else None,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        position_scheme=model.position,
        tapa_alpha=model.tapa.alpha,
        tapa_theta=model.tapa.theta,
        tapa_phase=model.tapa.phase,
        tapa_phase_scale=model.tapa.phase_scale,
        tapa_backend=model.tapa.backend,
        rope_base=model.rope.base,
        rope_scaling=model.rope.scaling,
        rope_scaling_factor=model.rope.factor,
        rope_original_max_position=model.rope.original_max_position,
        # Megatron scales q and k by YaRN's temperature whenever the config has this field: 1 means none
        yarn_rotary_scaling_factor=model.rope.factor if model.rope.scaling == "yarn" else 1.0,
        yarn_original_max_position_embeddings=model.rope.original_max_position,
        **recompute_options,
    )


def as_dict(model: ModelConfig):
    return dataclasses.asdict(model)
