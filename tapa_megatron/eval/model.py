"""A trained checkpoint as a single-process model for evaluation: per-token losses over token windows,
and access to each layer's core attention (for the pre-softmax scores of the distance-bias study)."""

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state

from tapa_megatron.config import from_dict
from tapa_megatron.data.tokenizer import load_tokenizer
from tapa_megatron.model import ModelConfig, build_gpt_model, transformer_config
from tapa_megatron.train import checkpoint
from tapa_megatron.train.distributed import init_process_group
from tapa_megatron.train.trainer import padded_vocab_size


@dataclass
class EvalModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: object
    train_length: int  # the sequence length the checkpoint was trained at
    name: str
    checkpoint: Path | None = None  # the step directory the weights came from
    step: int | None = None  # the training step of that checkpoint
    extended: bool = False  # the run started from another checkpoint (checkpoint.init_from): a context extension

    @torch.no_grad()
    def token_losses(self, tokens):
        """Next-token negative log-likelihoods (S-1,) of a 1-D token tensor: position i predicts token i+1."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)[None]
        return self.model(tokens[:, :-1], None, None, labels=tokens[:, 1:])[0].double()

    @torch.no_grad()
    def next_token_logits(self, tokens):
        """Logits (S, vocab) for a 1-D token sequence: row i scores the token after position i."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)[None]
        return self.model(tokens, None, None)[0].float()

    def core_attentions(self):
        return [layer.self_attention.core_attention for layer in self.model.decoder.layers]


def ensure_single_process():
    """Evaluation runs in one process: a one-rank group and Megatron's parallel state, if not set up yet."""
    init_process_group()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def load_eval_model(path, name=None):
    """Load a trained checkpoint (a step directory, or a run directory's newest one) for evaluation."""
    ensure_single_process()
    path = checkpoint.resolve_checkpoint(path)
    common = checkpoint.load_common(path)
    saved = common["config"]
    model_cfg = from_dict(ModelConfig, saved["model"], prefix="model.")
    model_cfg.tapa.backend = "auto"  # whatever this machine runs best; the math is the same
    tokenizer = load_tokenizer(Path(saved["data"]["path"]) / "tokenizer.json")
    vocab = padded_vocab_size(model_cfg.vocab_size or tokenizer.vocab_size, 1)
    torch.manual_seed(0)
    model = build_gpt_model(model_cfg, transformer_config(model_cfg), vocab_size=vocab,
                            max_sequence_length=saved["data"]["seq_length"])
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))["model"]
    result = model.load_state_dict(loaded, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for {missing[:3]}")
    model.eval()
    return EvalModel(model=model, config=model_cfg, tokenizer=tokenizer, train_length=saved["data"]["seq_length"],
                     name=name or saved.get("name", path.parent.parent.name), checkpoint=path,
                     step=common["train_state"]["step"],
                     extended=bool(saved.get("checkpoint", {}).get("init_from")))
