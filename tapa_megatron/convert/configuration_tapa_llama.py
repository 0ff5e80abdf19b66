"""TapaLlama configuration: a Llama shape plus TAPA's three settings (and no RoPE).

Self-contained (transformers only): `tapa convert megatron-to-hf` copies this file into the exported
directory so that `AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without tapa-megatron.
"""

import math
from transformers import PretrainedConfig

PHASES = ("quadratic", "linear")


class TapaLlamaConfig(PretrainedConfig):
    model_type = "tapa_llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,  # the context the model was trained at (TAPA itself has no limit)
        tapa_alpha=0.1,  # distance exponent: the phase turns with |m - n|^alpha
        tapa_theta=0.5,  # share of each head's dims that forms the amplitude part
        tapa_phase="quadratic",  # "quadratic" (q_P . k_P) or "linear" (the paper's ablation)
        tapa_phase_scale=6.283185307179586,  # the angle's factor: 2 pi as in the paper
        tapa_query_block=1024,  # queries per attention block: bounds the score matrix's memory
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        if kwargs.pop("head_dim", self.head_dim) != self.head_dim:
            raise ValueError(f"head_dim must be hidden_size / num_attention_heads = {self.head_dim} in TapaLlama.")
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.tapa_alpha = tapa_alpha
        self.tapa_theta = tapa_theta
        self.tapa_phase = tapa_phase
        self.tapa_phase_scale = tapa_phase_scale
        self.tapa_query_block = tapa_query_block
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate_tapa()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _validate_tapa(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}.")
        if not self.tapa_alpha > 0:
            raise ValueError(f"tapa_alpha={self.tapa_alpha} must be > 0 (the paper uses 0.1).")
        amplitude = self.tapa_theta * self.head_dim
        if not 0 < self.tapa_theta < 1 or amplitude != int(amplitude):
            raise ValueError(f"tapa_theta={self.tapa_theta} must lie in (0, 1) with tapa_theta * head_dim "
                             f"({self.head_dim}) a whole number of dims.")
        if not (math.isfinite(self.tapa_phase_scale) and self.tapa_phase_scale > 0):
            raise ValueError(f"tapa_phase_scale={self.tapa_phase_scale} must be a finite number > 0 (the paper's is 2 pi).")
        if self.tapa_phase not in PHASES:
            raise ValueError(f"tapa_phase={self.tapa_phase!r} is unknown; use one of {PHASES}.")

    @property
    def tapa_amplitude_dim(self):
        return int(self.tapa_theta * self.head_dim)
