"""Build a Megatron-Core GPTModel with TAPA (or RoPE) attention for one pipeline stage."""

from megatron.core.models.gpt import GPTModel

from tapa_megatron.model.config import ModelConfig
from tapa_megatron.model.specs import gpt_layer_spec


def build_gpt_model(model: ModelConfig, config, *, vocab_size, max_sequence_length, pre_process=True,
                    post_process=True, use_transformer_engine=None):
    """config: the TapaTransformerConfig from `transformer_config(model, ...)`. Positions never enter the
    embedding (position_embedding_type "none"): the core attention reads them."""
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(model.position, use_transformer_engine),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="none",
    )
