"""`tapa convert megatron-lm`: the directory Megatron-LM's `--load` reads (tracker file + iter_NNNNNNN),
loaded back with Megatron-Core's own `dist_checkpointing.load` into a vanilla GPTModel (Megatron's local
layer spec and its own rotary embedding, no tapa_megatron module in it): every weight equals ours."""

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from tapa_megatron.cli import main
from tapa_megatron.config import from_dict
from tapa_megatron.convert import hf_to_megatron, megatron_lm
from tapa_megatron.convert.megatron_checkpoint import EMBEDDING, single_process_megatron, stored_tensors
from tapa_megatron.model import transformer_config
from tapa_megatron.model.gpt import megatron_position_options
from tapa_megatron.train import RunConfig, checkpoint
from tests.convert.tiny import VOCAB, tiny_llama


def test_megatron_lm_directory_loads_into_a_vanilla_gpt_model(tmp_path, capsys):
    hf_model = tiny_llama(tmp_path / "hf")
    hf_to_megatron.convert(tmp_path / "hf", tmp_path / "ckpt", position="rope")
    main(["convert", "megatron-lm", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "mlm")])
    assert "latest_checkpointed_iteration.txt" in capsys.readouterr().out

    step = int((tmp_path / "mlm" / megatron_lm.TRACKER).read_text())
    loaded_dir = tmp_path / "mlm" / f"iter_{step:07d}"  # Megatron-LM's get_checkpoint_name
    common = torch.load(loaded_dir / "common.pt", weights_only=False)
    assert common["iteration"] == step and common["checkpoint_version"] == megatron_lm.CHECKPOINT_VERSION

    cfg = from_dict(RunConfig, checkpoint.load_common(tmp_path / "ckpt")["config"])
    padded_vocab = stored_tensors(tmp_path / "ckpt")[EMBEDDING].global_shape[0]
    with single_process_megatron():
        vanilla = GPTModel(config=transformer_config(cfg.model), transformer_layer_spec=get_gpt_layer_local_spec(
            normalization="RMSNorm"), vocab_size=padded_vocab, max_sequence_length=64,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings, **megatron_position_options(cfg.model))
        theirs = dist_checkpointing.load({"model": vanilla.sharded_state_dict()}, str(loaded_dir))["model"]
        ours = dist_checkpointing.load({"model": vanilla.sharded_state_dict()}, str(tmp_path / "ckpt"))["model"]
    weights = {key: value for key, value in theirs.items() if isinstance(value, torch.Tensor)}
    assert len(weights) > 10
    for key, value in weights.items():
        assert torch.equal(value, ours[key]), key
    # and ours are the Hugging Face model's (the conversion's own oracle is tests/convert/test_hf_to_megatron.py)
    embedding = weights["embedding.word_embeddings.weight"]
    assert torch.equal(embedding[:VOCAB], hf_model.model.embed_tokens.weight.detach())
    assert torch.equal(weights["output_layer.weight"][:VOCAB], hf_model.lm_head.weight.detach())
    result = vanilla.load_state_dict(theirs, strict=False)
    assert not [key for key in result.missing_keys if not key.endswith("_extra_state")] and not result.unexpected_keys


def test_megatron_lm_refuses_to_overwrite(tmp_path):
    tiny_llama(tmp_path / "hf")
    hf_to_megatron.convert(tmp_path / "hf", tmp_path / "ckpt", position="rope")
    megatron_lm.convert(tmp_path / "ckpt", tmp_path / "mlm")
    with pytest.raises(Exception, match="exists; pass --overwrite"):
        megatron_lm.convert(tmp_path / "ckpt", tmp_path / "mlm")
    megatron_lm.convert(tmp_path / "ckpt", tmp_path / "mlm", overwrite=True)
