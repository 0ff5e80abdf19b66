"""kill -9 at every moment that matters, then the same command again: the run always ends bit-identical
to the uninterrupted one (every logged loss, every weight and Adam moment), with no leftovers.

A run of 6 steps saves at steps 2, 4 and 6 and keeps 2. Each case kills it with SIGKILL at one point of
one step (child.KILL_POINTS: during a step, at each stage of a save, right after the rename, during the
rotation), then reruns it to the end. CI runs SWEEP (10 cases); `pytest -m slow` runs every point at
every step it applies to (FULL_SWEEP, 25 cases).
"""

import pytest

from tapa_megatron.train import checkpoint
from tests.reliability import child, forked
from tests.reliability.conftest import STEPS, SWEEP, assert_same_tensors, tiny_config

SAVE_POINTS = ("save-start", "mid-write", "files-written", "hashing", "marker-written", "renamed")
SWEEP_CASES = [("before-step", 1), ("after-update", 3), ("save-start", 2), ("mid-write", 4), ("files-written", 2),
               ("hashing", 4), ("marker-written", 4), ("renamed", 2), ("rotating", 6), ("renamed", 6)]
FULL_SWEEP = sorted({*SWEEP_CASES, *((point, step) for point in SAVE_POINTS for step in (2, 4, 6)),
                     ("before-step", 3), ("before-step", 6), ("after-update", 1), ("after-update", 6)})


def kill_then_rerun(point, step, novels_data, reference, tmp_path):
    cfg = tiny_config(tmp_path / "run", novels_data, *SWEEP)
    killed = forked.run(child.train, cfg, (point, step))
    assert killed.killed, f"the run was not killed {child.KILL_POINTS[point]} ({killed.status}: {killed.value})"
    rerun = forked.run(child.train, cfg).result()
    start = rerun["start_step"]
    assert rerun["losses"] == reference["losses"][start:]  # bitwise: the same floats
    root = checkpoint.checkpoint_root(cfg.run_dir)
    assert_same_tensors(rerun["final"], reference["tensors"], tmp_path / "final.pt")
    assert checkpoint.verify(rerun["final"]) == []
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert (root / "latest").read_text() == "step_00000006"
    return start


@pytest.mark.parametrize("point,step", SWEEP_CASES, ids=[f"{p}@{s}" for p, s in SWEEP_CASES])
def test_kill_9_then_rerun_is_bit_identical(point, step, novels_data, reference, tmp_path):
    start = kill_then_rerun(point, step, novels_data, reference, tmp_path)
    # It resumed from the newest checkpoint that was complete when it died, losing only the steps since.
    complete_before = {"renamed": step, "rotating": step}.get(point, (step - 1) // 2 * 2)
    assert start == min(complete_before, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("point,step", FULL_SWEEP, ids=[f"{p}@{s}" for p, s in FULL_SWEEP])
def test_full_kill_9_sweep(point, step, novels_data, reference, tmp_path):
    kill_then_rerun(point, step, novels_data, reference, tmp_path)
