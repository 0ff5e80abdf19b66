"""Build a Megatron-Core GPTModel with TAPA (or a baseline's) attention for one pipeline stage.

Two stacks for the RoPE / NoPE baselines:
    ours      position_embedding_type "none"; SoftmaxCoreAttention rotates q, k from token positions
              (CPU, and GPU without Transformer Engine; context parallelism by tapa_megatron.parallel)
    Megatron  what a RoPE user trains with on GPU: GPTModel's RotaryEmbedding / YarnRotaryEmbedding and
              Transformer Engine's attention (with its own context parallelism); chosen when TE is used
TAPA always reads positions in its core attention.
"""

from megatron.core.models.gpt import GPTModel

from tapa_megatron.model.config import ModelConfig
from tapa_megatron.model.qkv import scale_phase_rows
from tapa_megatron.model.specs import gpt_layer_spec, transformer_engine_available


def megatron_position_options(model: ModelConfig):
    """GPTModel's arguments for a baseline on Megatron's own rotary embeddings (YaRN's settings are
    fields of the TransformerConfig, set by `transformer_config`)."""
    if model.position == "none":
        return dict(position_embedding_type="none")
    rope = model.rope
    if rope.scaling == "yarn":
        return dict(position_embedding_type="yarn", rotary_base=rope.base)
    interpolation = rope.factor if rope.scaling == "pi" else None
    return dict(position_embedding_type="rope", rotary_base=rope.base, seq_len_interpolation_factor=interpolation)


def build_gpt_model(model: ModelConfig, config, *, vocab_size, max_sequence_length, pre_process=True,
                    post_process=True, use_transformer_engine=None, megatron_positions=None):
    """config: the TapaTransformerConfig from `transformer_config(model, ...)`.

    megatron_positions: None uses Megatron's rotary stack for the baselines exactly when Transformer
    Engine's layers are used; TAPA ignores it (positions never enter its embedding)."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if megatron_positions is None:
        megatron_positions = use_transformer_engine
    megatron_positions = megatron_positions and model.position != "tapa"
    positions = megatron_position_options(model) if megatron_positions else dict(position_embedding_type="none")
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(model.position, use_transformer_engine, megatron_positions),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        **positions,
    )
    if model.position == "tapa" and model.tapa.phase_init_scale != 1.0:
        scale_phase_rows(gpt, model.tapa.phase_init_scale)
    return gpt
