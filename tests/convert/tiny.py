"""Tiny random Llama models built from a LlamaConfig (no downloads), and our Megatron model's logits
from a checkpoint, loaded the way the trainer loads checkpoint.init_from."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 200  # not a multiple of 128: Megatron pads the vocabulary


def tiny_llama(hf_dir, dtype=torch.float32, shard_size="40KB", seed=0, **overrides):
    """Save a random tiny LlamaForCausalLM to hf_dir (in several safetensors shards); return the model."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype).eval()
    model.save_pretrained(hf_dir, max_shard_size=shard_size)
    return model


def tokens(batch=2, length=24, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def megatron_logits(checkpoint_dir, input_ids):
    """Logits [b, s, padded vocab] of our GPTModel built from the checkpoint's own config and loaded with
    the trainer's load_checkpoint (weights only, as for checkpoint.init_from)."""
    from tapa_megatron.config import from_dict
    from tapa_megatron.convert.megatron_checkpoint import EMBEDDING, single_process_megatron, stored_tensors
    from tapa_megatron.model import build_gpt_model, transformer_config
    from tapa_megatron.train import RunConfig, checkpoint

    cfg = from_dict(RunConfig, checkpoint.load_common(checkpoint_dir)["config"])
    padded_vocab = stored_tensors(checkpoint_dir)[EMBEDDING].global_shape[0]
    with single_process_megatron():
        model = build_gpt_model(cfg.model, transformer_config(cfg.model), vocab_size=padded_vocab,
                                max_sequence_length=input_ids.shape[1])
        checkpoint.load_checkpoint(checkpoint_dir, model, engine=None, with_optimizer=False)
        with torch.no_grad():
            return model(input_ids, None, None)
