"""The trainer on real gloo processes: layouts agree with one process, resume is exact, saving is atomic,
extension to a longer context works."""

import json
from pathlib import Path

import pytest
import torch

from tapa_megatron.config import load_config
from tapa_megatron.train import RunConfig
from tests.distributed import run_ranks

SEQ = 32


def run_config(run_dir, data, *overrides):
    return load_config(RunConfig, None, [
        f"run_dir={run_dir}", f"data.path={data}", f"data.seq_length={SEQ}", "data.split=1,1,0",
        "training.steps=4", "training.global_batch_size=8", "training.micro_batch_size=2",
        "training.tensorboard=false", "optimizer.lr=3e-3", "optimizer.warmup_steps=1",
        "model.num_layers=4", *overrides])


def _train(rank, world_size, cfg, fail_saving_step=None):
    from tapa_megatron.train import checkpoint, train

    if fail_saving_step is not None:  # a crash in the middle of writing that step's checkpoint
        real_save = checkpoint.dist_checkpointing.save

        def crashing_save(state, path, **kwargs):
            if Path(path).name.startswith(checkpoint.checkpoint_name(fail_saving_step)):
                (Path(path) / "__0_0.distcp").write_bytes(b"half a tensor")
                raise RuntimeError("node lost while saving")
            return real_save(state, path, **kwargs)

        checkpoint.dist_checkpointing.save = crashing_save
    result = train(cfg)
    return [(step, loss, grad_norm) for step, loss, grad_norm in result.losses], str(result.final_checkpoint)


def _model_state(rank, world_size, cfg, path):
    """The model weights stored in a checkpoint, loaded through Megatron's dist_checkpointing."""
    from megatron.core import dist_checkpointing, parallel_state

    from tapa_megatron.data.tokenizer import load_tokenizer
    from tapa_megatron.model import build_gpt_model, transformer_config
    from tapa_megatron.train.trainer import padded_vocab_size

    parallel_state.initialize_model_parallel()
    try:
        vocab = padded_vocab_size(load_tokenizer(Path(cfg.data.path) / "tokenizer.json").vocab_size, 1)
        model = build_gpt_model(cfg.model, transformer_config(cfg.model), vocab_size=vocab, max_sequence_length=SEQ)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"]
        return {k: v.clone() for k, v in loaded.items() if torch.is_tensor(v)}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def initial_checkpoint(novels_data, tmp_path_factory):
    """Step-0 weights, so every layout starts from the same model (pipeline stages draw their own init)."""
    cfg = run_config(tmp_path_factory.mktemp("init"), novels_data, "training.steps=0")
    return run_ranks(1, _train, cfg)[0][1]


@pytest.fixture(scope="module")
def single_process(novels_data, initial_checkpoint, tmp_path_factory):
    cfg = run_config(tmp_path_factory.mktemp("single"), novels_data, f"checkpoint.init_from={initial_checkpoint}")
    return run_ranks(1, _train, cfg)[0]


LAYOUTS = {  # name: (processes, overrides); data parallelism is whatever the processes leave over
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2": (2, []),
    "cp2-ring": (2, ["parallel.context=2"]),
    "cp2-a2a": (2, ["parallel.context=2", "parallel.context_comm=a2a"]),
    "cp2xtp2-allgather": (4, ["parallel.context=2", "parallel.tensor=2", "parallel.context_comm=all_gather"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_match_single_process(layout, novels_data, initial_checkpoint, single_process, tmp_path):
    processes, overrides = LAYOUTS[layout]
    cfg = run_config(tmp_path, novels_data, f"checkpoint.init_from={initial_checkpoint}", *overrides)
    ranks = run_ranks(processes, _train, cfg)
    expected = single_process[0]
    assert len(expected) == 4 and expected[-1][1] < expected[0][1]  # it learns
    for losses, _ in ranks:
        for (step, loss, grad_norm), (_, ref_loss, ref_norm) in zip(losses, expected, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5), (layout, step)
            assert grad_norm == pytest.approx(ref_norm, rel=1e-4), (layout, step)


BASELINE = ["checkpoint.allow_mismatch=[position]", "model.position=rope", "model.rope.scaling=yarn", "model.rope.factor=4", "model.rope.original_max_position=8"]
BASELINE_LAYOUTS = {  # RoPE (YaRN, whose ramp and temperature both act at this length) under context parallelism
    "cp2-ring": (2, ["parallel.context=2"]),
    "cp2xtp2-a2a": (4, ["parallel.context=2", "parallel.tensor=2", "parallel.context_comm=a2a"]),
}


@pytest.fixture(scope="module")
def baseline_single_process(novels_data, initial_checkpoint, tmp_path_factory):
    cfg = run_config(tmp_path_factory.mktemp("baseline"), novels_data, f"checkpoint.init_from={initial_checkpoint}",
                     *BASELINE)
    return run_ranks(1, _train, cfg)[0]


@pytest.mark.parametrize("layout", BASELINE_LAYOUTS)
def test_rope_baseline_under_context_parallelism_matches_single_process(layout, novels_data, initial_checkpoint,
                                                                        baseline_single_process, tmp_path):
    processes, overrides = BASELINE_LAYOUTS[layout]
    cfg = run_config(tmp_path, novels_data, f"checkpoint.init_from={initial_checkpoint}", *BASELINE, *overrides)
    expected = baseline_single_process[0]
    for losses, _ in run_ranks(processes, _train, cfg):
        for (step, loss, grad_norm), (_, ref_loss, ref_norm) in zip(losses, expected, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5), (layout, step)
            assert grad_norm == pytest.approx(ref_norm, rel=1e-4), (layout, step)


def test_resume_is_exact(novels_data, initial_checkpoint, single_process, tmp_path):
    """Stop after 2 steps, resume: the same losses, bitwise, and the same final weights as one go."""
    cfg = run_config(tmp_path, novels_data, f"checkpoint.init_from={initial_checkpoint}",
                     "training.exit_after_steps=2")
    first, _ = run_ranks(1, _train, cfg)[0]
    second, final = run_ranks(1, _train, cfg)[0]  # same command again: resume=auto picks up step 2
    assert [s for s, _, _ in first] == [0, 1] and [s for s, _, _ in second] == [2, 3]
    assert first + second == single_process[0]
    resumed = run_ranks(1, _model_state, cfg, final)[0]
    uninterrupted = run_ranks(1, _model_state, cfg, single_process[1])[0]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_crash_while_saving_keeps_the_previous_checkpoint(novels_data, initial_checkpoint, single_process, tmp_path):
    """A save that fails removes its own partial files; the checkpoint before it stays (a kill -9 mid-save,
    which leaves them, is tests/reliability/test_kill_sweep.py)."""
    cfg = run_config(tmp_path, novels_data, f"checkpoint.init_from={initial_checkpoint}", "checkpoint.save_every=2",
                     "checkpoint.keep=1")
    with pytest.raises(AssertionError, match="node lost while saving"):
        run_ranks(1, _train, cfg, 4)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step_00000002"]
    assert json.loads((checkpoints / "step_00000002" / "tapa_complete.json").read_text())["step"] == 2
    resumed, final = run_ranks(1, _train, cfg)[0]
    assert resumed == single_process[0][2:]
    assert Path(final).name == "step_00000004"


def test_extension_to_four_times_the_length(novels_data, single_process, tmp_path):
    """A checkpoint trained at L loads into a run at 4L (new layout too) and keeps training."""
    cfg = run_config(tmp_path, novels_data, f"checkpoint.init_from={Path(single_process[1]).parent.parent}",
                     f"data.seq_length={4 * SEQ}", "training.steps=2", "training.global_batch_size=2",
                     "training.micro_batch_size=1", "optimizer.warmup_steps=0", "parallel.tensor=2")
    losses = run_ranks(2, _train, cfg)[0][0]
    start_loss = single_process[0][-1][1]
    assert len(losses) == 2 and all(loss < start_loss + 0.5 for _, loss, _ in losses)  # trained weights, not fresh
    mismatched = run_config(tmp_path / "bad", novels_data, f"checkpoint.init_from={single_process[1]}",
                            "model.num_layers=2")
    with pytest.raises(AssertionError, match="num_layers: 4 in .* 2 here"):
        run_ranks(1, _train, mismatched)
