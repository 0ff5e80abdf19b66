"""Stopping a run: SIGINT (Ctrl-C) checkpoints at an agreed step and exits 75 like SIGTERM, in one process
and under the --nproc launcher; a second Ctrl-C interrupts at once; a launcher killed with SIGKILL takes
its ranks with it instead of leaving them training."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tapa_megatron.launch.signals import PREEMPTED_EXIT_STATUS, StopRequest
from tapa_megatron.train import checkpoint
from tests.reliability import child, forked
from tests.reliability.conftest import SWEEP, assert_same_tensors, tiny_args, tiny_config


def test_sigint_asks_for_a_stop_and_a_second_one_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigint_checkpoints_at_the_step_and_the_rerun_is_exact(novels_data, reference, tmp_path):
    cfg = tiny_config(tmp_path / "run", novels_data, *SWEEP)
    stopped = forked.run(child.train_signalled, cfg, signal.SIGINT, 3).result()
    assert stopped["preempted"] and stopped["signal"] == "SIGINT"
    assert stopped["final"].endswith("step_00000003") and checkpoint.verify(stopped["final"]) == []
    rerun = forked.run(child.train, cfg).result()
    assert rerun["start_step"] == 3 and rerun["losses"] == reference["losses"][3:]
    assert_same_tensors(rerun["final"], reference["tensors"], tmp_path / "final.pt")


def _launch(run_dir, data, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "tapa_megatron.cli", "train", "tiny-cpu", "--nproc", "2",
                             *tiny_args(run_dir, data, "training.steps=1000", "checkpoint.save_every=0")],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def _wait_for(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _children(pid):
    """The rank processes a launcher spawned (multiprocessing's spawn_main), by their parent pid."""
    ranks = []
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_text()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and "spawn_main" in cmdline:
            ranks.append(int(proc.name))
    return ranks


def _alive(pid):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigint_to_the_launcher_checkpoints_every_rank_and_exits_75(novels_data, tmp_path):
    log = tmp_path / "log"
    launcher = _launch(tmp_path / "run", novels_data, log)
    try:
        _wait_for(lambda: "step 2/1000" in log.read_text(), "step 2")
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=300) == PREEMPTED_EXIT_STATUS
    finally:
        launcher.kill()
    text = log.read_text()
    stopped = int(text.split("every rank stops after step ")[1].split()[0])
    final = checkpoint.checkpoint_root(tmp_path / "run") / checkpoint.checkpoint_name(stopped)
    assert checkpoint.verify(final) == [] and "Traceback" not in text


def test_the_ranks_die_with_a_launcher_killed_with_sigkill(novels_data, tmp_path):
    log = tmp_path / "log"
    launcher = _launch(tmp_path / "run", novels_data, log)
    ranks = []
    try:
        _wait_for(lambda: "step 2/1000" in log.read_text(), "step 2")
        ranks = _children(launcher.pid)
        assert len(ranks) == 2
        launcher.kill()
        launcher.wait()
        _wait_for(lambda: not any(_alive(pid) for pid in ranks), "the ranks to die", timeout=30)
    finally:
        launcher.kill()
        for pid in filter(_alive, ranks):  # what a failed test would leave
            os.kill(pid, signal.SIGKILL)
