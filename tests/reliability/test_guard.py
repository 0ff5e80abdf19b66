"""NaN/Inf injection: a non-finite loss or gradient norm stops the run on every rank before anything is
saved, so the newest good checkpoint survives even with checkpoint.keep=1; skip mode skips a bounded
number of such steps without applying them; the command prints one line, from rank 0, and exits 1."""

import os
import re
import subprocess
import sys

from tapa_megatron.train import checkpoint
from tests.reliability import child, forked
from tests.reliability.conftest import assert_same_tensors, checkpoint_tensors, tiny_args, tiny_config

SAVE_EVERY_STEP = ["training.steps=6", "checkpoint.save_every=1", "checkpoint.keep=1"]  # `pretrained`'s schedule


def test_a_nan_step_stops_the_run_before_anything_is_saved(novels_data, pretrained, tmp_path):
    cfg = tiny_config(tmp_path / "run", novels_data, *SAVE_EVERY_STEP)
    run = forked.run(child.train, cfg, None, [3]).result()
    assert run["error"].startswith("training stopped at step 3: the loss is nan (gradient norm nan); nothing was "
                                   "saved after the last checkpoint and the newest checkpoint, step_00000002, is "
                                   "untouched.")
    assert "training.skip_nonfinite_steps=N" in run["error"]
    root = checkpoint.checkpoint_root(cfg.run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # keep=1 rotated nothing out
    assert checkpoint.verify(root / "step_00000002") == []
    # It holds the good step-2 state: the same tensors as step 2 of the run that never saw a NaN.
    assert_same_tensors(root / "step_00000002",
                        checkpoint_tensors(checkpoint.checkpoint_root(pretrained) / "step_00000002", tmp_path / "a.pt"),
                        tmp_path / "b.pt")


def test_skip_mode_skips_a_bounded_number_of_bad_steps_without_applying_them(novels_data, tmp_path):
    cfg = tiny_config(tmp_path / "run", novels_data, "training.steps=6", "checkpoint.save_every=1",
                      "checkpoint.keep=0", "training.skip_nonfinite_steps=1")
    run = forked.run(child.train, cfg, None, [3]).result()
    assert "[guard] step 3: the loss is nan (gradient norm nan): update skipped, 1 of at most 1 this job " \
           "(training.skip_nonfinite_steps)" in run["log"]
    assert [step for step, _, _ in run["losses"]] == [0, 1, 2, 3, 4, 5]
    root = checkpoint.checkpoint_root(cfg.run_dir)
    # The skipped step changed nothing: weights and Adam moments after step 3 are those after step 2.
    assert_same_tensors(root / "step_00000003", checkpoint_tensors(root / "step_00000002", tmp_path / "2.pt"),
                        tmp_path / "3.pt")
    assert all(loss == loss for step, loss, _ in run["losses"] if step != 2)  # finite before and after

    second = forked.run(child.train, tiny_config(tmp_path / "again", novels_data, "training.steps=5",
                                                 "training.skip_nonfinite_steps=1"), None, [2, 4]).result()
    assert second["error"].startswith("training stopped at step 4: the loss is nan (gradient norm nan) after "
                                      "skipping 1 such step(s) (training.skip_nonfinite_steps=1)")


def test_every_rank_stops_at_the_same_step_when_one_rank_sees_nan(novels_data, tmp_path):
    cfg = tiny_config(tmp_path / "run", novels_data, *SAVE_EVERY_STEP)  # 2 data-parallel ranks
    runs = [outcome.result() for outcome in forked.run_ranks(2, child.train, cfg, None, [2], [1])]
    assert runs[0]["error"] == runs[1]["error"]
    assert runs[0]["error"].startswith("training stopped at step 2: the loss is nan")
    root = checkpoint.checkpoint_root(cfg.run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]


def test_a_diverging_command_line_run_prints_one_line_from_rank_0_and_exits_1(novels_data, tmp_path):
    """optimizer.lr=1e30 is finite, so it passes validation; step 2 applies it and step 3's loss is not."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "tapa_megatron.cli", "train", "tiny-cpu", "--nproc", "2",
                             *tiny_args(run_dir, novels_data, *SAVE_EVERY_STEP, "optimizer.lr=1e30")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("tapa:")]
    assert len(errors) == 1 and re.match(r"tapa: training stopped at step 3: the loss is (nan|inf)", errors[0])
    assert "optimizer.lr is 1e+30" in errors[0]
    assert "Traceback" not in result.stderr
    root = checkpoint.checkpoint_root(run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert checkpoint.verify(root / "step_00000002") == []  # huge but finite weights, complete
