"""Shared runs for the reliability suite: one uninterrupted reference run and one run stopped part-way
(checkpoints at steps 2 and 4 of 6) that the tests resume, extend, damage (on a copy) and throw bad input
at. Both are the tiny-cpu recipe at 32 tokens, trained in a forked child (forked.py)."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tapa_megatron import cli
from tapa_megatron.config import load_config
from tapa_megatron.train import RunConfig
from tests.reliability import child, forked

RECIPE = cli.RECIPES_DIR / "tiny-cpu.yaml"
TINY = ["data.split=1,1,0", "data.seq_length=32", "training.global_batch_size=4", "training.micro_batch_size=2",
        "training.log_every=1", "training.tensorboard=false", "optimizer.warmup_steps=1"]
STEPS = 6
SWEEP = [f"training.steps={STEPS}", "checkpoint.save_every=2", "checkpoint.keep=2"]


def tiny_args(run_dir, data, *overrides):
    return [f"run_dir={run_dir}", f"data.path={data}", *TINY, *overrides]


def tiny_config(run_dir, data, *overrides):
    return load_config(RunConfig, RECIPE, tiny_args(run_dir, data, *overrides))


def checkpoint_tensors(path, scratch):
    """Every tensor of a checkpoint (weights and Adam moments), read without building a model."""
    dcp_to_torch_save(path, scratch)
    return {key: value for key, value in torch.load(scratch, weights_only=False).items() if torch.is_tensor(value)}


def assert_same_tensors(path, expected, scratch):
    ours = checkpoint_tensors(path, scratch)
    assert ours.keys() == expected.keys() and len(ours) > 20
    different = [key for key in ours if not torch.equal(ours[key], expected[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def file_states(*roots):
    """{path: (size, mtime_ns)} of every file under roots: any write, rename or deletion shows."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def file_hashes(*roots):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session")
def reference(novels_data, tmp_path_factory):
    """The uninterrupted run: every step's (step, loss, grad norm) and the final checkpoint's tensors."""
    root = tmp_path_factory.mktemp("reference")
    run = forked.run(child.train, tiny_config(root / "run", novels_data, *SWEEP)).result()
    assert [step for step, _, _ in run["losses"]] == list(range(STEPS))
    return {"losses": run["losses"], "tensors": checkpoint_tensors(run["final"], root / "final.pt"),
            "run_dir": root / "run"}


@pytest.fixture(scope="session")
def pretrained(novels_data, tmp_path_factory):
    """The reference run stopped after step 4 (training.exit_after_steps): checkpoints at steps 2 and 4 and a
    run that is not finished. Tests that change it work on a copy (copy_run)."""
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    run = forked.run(child.train, tiny_config(run_dir, novels_data, *SWEEP, "training.exit_after_steps=4")).result()
    assert run["final"].endswith("step_00000004")
    return run_dir


def copy_run(run_dir, to):
    shutil.copytree(run_dir, to)
    return to
