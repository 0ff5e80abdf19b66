"""Every recipe's model builds a Megatron TransformerConfig for the layout it declares for its GPUs:
Megatron-Core's own validation (TransformerConfig.__post_init__) is the oracle, run here on CPU."""

from pathlib import Path

import pytest
import torch

from tapa_megatron.config import load_config
from tapa_megatron.train import RunConfig
from tapa_megatron.train.trainer import run_transformer_config

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_passes_megatron_transformer_config(recipe):
    """Bug 4: sequence_parallel with tensor=1 (the llama3-1b recipes) is refused by TransformerConfig."""
    cfg = load_config(RunConfig, recipe)
    dtype = torch.float32 if cfg.training.precision == "fp32" else torch.bfloat16  # what a GPU run picks
    config = run_transformer_config(cfg, dtype)
    p = cfg.parallel
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.context_parallel_size) \
        == (p.tensor, p.pipeline, p.context)
    assert config.sequence_parallel == (p.sequence_parallel and p.tensor > 1)
    assert config.num_layers % p.pipeline == 0 and config.num_attention_heads % p.tensor == 0


def test_sequence_parallel_kept_where_tensor_parallel():
    """The guard only drops sequence parallelism where there is no tensor-parallel region to split."""
    cfg = load_config(RunConfig, RECIPES[0], ["parallel.tensor=2", "parallel.sequence_parallel=true",
                                               "model.num_layers=2"])
    assert run_transformer_config(cfg, torch.bfloat16).sequence_parallel
