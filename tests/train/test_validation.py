"""Validation during training: the logged validation loss is the model's loss over the held-out batches,
computed here independently (float64 cross-entropy of the checkpoint's logits); pipeline stages agree
with one process; the run ends with a summary, and a rerun of a finished run says so."""

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks
from tests.train.test_trainer import SEQ, run_config

EVAL = ["training.eval_every=2", "training.eval_iters=2"]


def _train(rank, world_size, cfg):
    from tapa_megatron.train import train

    lines = []
    result = train(cfg, report=lines.append)
    return result.validation, str(result.final_checkpoint), lines, len(result.losses)


def _independent_validation_loss(rank, world_size, cfg, checkpoint_path):
    """The checkpoint's mean token loss over validation samples [0, eval_iters x global batch), by hand."""
    from megatron.core import dist_checkpointing, parallel_state

    from tapa_megatron.data.dataset import build_datasets
    from tapa_megatron.data.tokenizer import load_tokenizer
    from tapa_megatron.model import build_gpt_model, transformer_config
    from tapa_megatron.train.trainer import padded_vocab_size

    parallel_state.initialize_model_parallel()
    try:
        tokenizer = load_tokenizer(Path(cfg.data.path) / "tokenizer.json")
        model = build_gpt_model(cfg.model, transformer_config(cfg.model),
                                vocab_size=padded_vocab_size(tokenizer.vocab_size, 1), max_sequence_length=SEQ)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, checkpoint_path)["model"]
        result = model.load_state_dict(loaded, strict=False)  # the sharded format omits `_extra_state` slots
        assert not [key for key in result.missing_keys if not key.endswith("_extra_state")]
        model.eval()
        t = cfg.training
        count = t.eval_iters * t.global_batch_size
        _, valid_ds = build_datasets(cfg.data.path, tokenizer, SEQ, cfg.data.seed, t.steps * t.global_batch_size,
                                     count, split=cfg.data.split)
        total, tokens = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            for i in range(count):
                sample = valid_ds[i]
                logits = model(torch.as_tensor(sample["tokens"])[None], None, None)[0].double()
                losses = torch.nn.functional.cross_entropy(logits, torch.as_tensor(sample["labels"]), reduction="none")
                mask = torch.as_tensor(sample["loss_mask"]).double()
                total += (losses * mask).sum()
                tokens += mask.sum().item()
        return (total / tokens).item()
    finally:
        parallel_state.destroy_model_parallel()


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_validation_loss_matches_an_independent_computation(novels_data, tmp_path):
    cfg = run_config(tmp_path, novels_data, *EVAL, "training.tensorboard=true")
    validation, final, lines, _ = run_ranks(1, _train, cfg)[0]
    assert [step for step, _ in validation] == [2, 4]
    expected = run_ranks(1, _independent_validation_loss, cfg, final)[0]
    assert validation[-1][1] == pytest.approx(expected, rel=1e-5)
    assert validation[-1][1] < validation[0][1]  # it learns, so the two evaluations differ

    logged = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in logged] == validation
    best = min(loss for _, loss in validation)
    assert any(f"best {best:.4f} at step 4" in line for line in lines), lines
    assert any(line.startswith("[summary]") and "newest checkpoint" in line and final in line for line in lines)

    scalars = _scalars(tmp_path)  # Megatron-LM's names
    assert [step for step, _ in scalars["lm loss validation"]] == [2, 4]
    assert [v for _, v in scalars["lm loss validation"]] == pytest.approx([v for _, v in validation], rel=1e-6)
    assert [step for step, _ in scalars["lm loss"]] == [1, 2, 3, 4]
    assert scalars["consumed-tokens"][-1] == (4, 4 * cfg.training.global_batch_size * SEQ)
    assert {"learning-rate", "grad-norm", "iteration-time", "throughput"} <= scalars.keys()

    _, _, rerun_lines, steps_run = run_ranks(1, _train, cfg)[0]
    assert steps_run == 0
    assert any("is already finished: step 4 of 4" in line for line in rerun_lines), rerun_lines


def test_pipeline_stages_give_the_single_process_validation_loss(novels_data, tmp_path):
    init = run_ranks(1, _train, run_config(tmp_path / "init", novels_data, "training.steps=0"))[0][1]
    common = [f"checkpoint.init_from={init}", "training.steps=2", *EVAL]
    single = run_ranks(1, _train, run_config(tmp_path / "one", novels_data, *common))[0][0]
    pipelined = run_ranks(2, _train, run_config(tmp_path / "pp2", novels_data, *common, "parallel.pipeline=2"))
    assert [step for step, _ in single] == [2]
    for rank_validation, *_ in pipelined:  # every rank returns the same (global) value
        assert rank_validation[0][1] == pytest.approx(single[0][1], rel=1e-5)


def test_eval_every_without_a_validation_split_is_refused(novels_data, tmp_path):
    cfg = run_config(tmp_path, novels_data, *EVAL, "data.split=1,0,0")
    with pytest.raises(AssertionError, match="needs a validation share in data.split"):
        run_ranks(1, _train, cfg)


def test_weights_and_biases_offline(novels_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = run_config(tmp_path, novels_data, *EVAL, "training.steps=2", "logging.wandb=true")
    validation = run_ranks(1, _train, cfg)[0][0]
    record = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()  # wandb's offline log
    # Its history rows are protobufs holding each key and its value as JSON text.
    assert b"lm loss validation" in record and b"iteration-time" in record
    assert json.dumps(validation[-1][1]).encode() in record
