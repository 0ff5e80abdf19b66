"""What the forked children (forked.py) run: a training run, optionally killed with SIGKILL at a named
point, or fed a NaN at a given step. The faults are installed by patching the trainer's collaborators in
the child only; the code under test is the code users run."""

import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from megatron.core import dist_checkpointing  # noqa: F401 - imported once, in the fork server

from tapa_megatron.train import checkpoint, engine, trainer
from tapa_megatron.train import step as train_step
from tapa_megatron.train.errors import RunError

KILL_POINTS = {
    "before-step": "as step N starts (its batches are being read)",
    "after-update": "right after step N's optimizer update, before anything is logged or saved",
    "save-start": "step N's .partial directory made, nothing written into it",
    "mid-write": "while the tensors of step N's checkpoint are being written",
    "files-written": "step N's files written, no checksums and no marker yet",
    "hashing": "while step N's files are being hashed for the marker",
    "marker-written": "step N's marker written inside .partial, not yet renamed into place",
    "renamed": "right after step N's checkpoint was renamed into place (latest and rotation not done)",
    "rotating": "while the rotation after step N's save is deleting an old checkpoint",
}


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(point, step):
    """Patch this process so that it SIGKILLs itself at `point` of step `step` (KILL_POINTS)."""
    assert point in KILL_POINTS, point
    saving = {"now": False}
    ours = checkpoint.checkpoint_name(step)
    if point == "before-step":
        real_batches = trainer.micro_batches

        def micro_batches(dataset, index, *args, **kwargs):
            if index + 1 == step:
                _die()
            return real_batches(dataset, index, *args, **kwargs)

        trainer.micro_batches = micro_batches
        return
    if point == "after-update":
        real_step, calls = torch.optim.AdamW.step, {"n": 0}

        def optimizer_step(self, *args, **kwargs):
            out = real_step(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == step:
                _die()
            return out

        torch.optim.AdamW.step = optimizer_step
        return

    real_save = checkpoint.dist_checkpointing.save

    def save(state, path, **kwargs):
        saving["now"] = Path(path).name.startswith(ours)
        if saving["now"] and point == "save-start":
            _die()
        out = real_save(state, path, **kwargs)
        if saving["now"] and point == "files-written":
            _die()
        return out

    checkpoint.dist_checkpointing.save = save
    if point == "mid-write":
        assert hasattr(dcp_filesystem, "_write_item"), "torch moved dcp's _write_item: update this kill point"
        real_write, written = dcp_filesystem._write_item, {"n": 0}

        def write_item(*args, **kwargs):
            out = real_write(*args, **kwargs)
            written["n"] += saving["now"]
            if written["n"] == 5:  # a few tensors of the shard file are on disk
                _die()
            return out

        dcp_filesystem._write_item = write_item
    elif point == "hashing":
        real_hash, hashed = checkpoint._sha256, {"n": 0}

        def sha256(path):
            hashed["n"] += ours in str(path)
            if hashed["n"] == 2:
                _die()
            return real_hash(path)

        checkpoint._sha256 = sha256
    elif point in ("marker-written", "renamed"):
        real_replace = os.replace

        def replace(source, target):
            ours_now = Path(target).name == ours
            if ours_now and point == "marker-written":
                _die()
            real_replace(source, target)
            if ours_now and point == "renamed":
                _die()

        checkpoint.os.replace = replace
    elif point == "rotating":
        real_rmtree = checkpoint.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if saving["now"] and str(path).endswith(checkpoint.REMOVING_SUFFIX):
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                files[len(files) // 2].unlink()  # half way through deleting it
                _die()
            return real_rmtree(path, *args, **kwargs)

        checkpoint.shutil.rmtree = rmtree


def _install_nan(steps, ranks=None):
    """Make the loss NaN at the given steps (1-based) on the given ranks (default all), inside the forward,
    so that the backward and the gradient all-reduce carry it to every rank as a real NaN would."""
    real_forward_backward, real_loss_func = engine.PortableEngine.forward_backward, train_step.loss_func
    state = {"steps_done": 0, "poison": False}

    def loss_func(loss_mask, per_token_loss):
        return real_loss_func(loss_mask, per_token_loss * math.nan if state["poison"] else per_token_loss)

    def forward_backward(self, micro_batches, forward_only=False):
        if not forward_only:
            state["steps_done"] += 1
        rank = torch.distributed.get_rank()
        state["poison"] = (not forward_only and state["steps_done"] in steps
                           and (ranks is None or rank in ranks))
        try:
            return real_forward_backward(self, micro_batches, forward_only=forward_only)
        finally:
            state["poison"] = False

    engine.PortableEngine.forward_backward = forward_backward
    train_step.loss_func = loss_func


def train(cfg, kill=None, nan_steps=(), nan_ranks=None):
    """Train cfg; kill: (point, step) to die at; nan_steps: steps whose loss and gradients become NaN.
    Returns what the run did, or {"error": message} for a RunError."""
    if kill is not None:
        _install_kill(*kill)
    if nan_steps:
        _install_nan(set(nan_steps), nan_ranks)
    log = []
    try:
        result = trainer.train(cfg, report=log.append)
    except RunError as err:
        return {"error": str(err), "log": log}
    return {"losses": result.losses, "final": str(result.final_checkpoint), "start_step": result.start_step,
            "preempted": result.preempted, "log": log}


def train_signalled(cfg, signum, at_step):
    """Train cfg as `tapa train` does in-process (stop signals recorded by StopRequest), sending this process
    signum during step at_step."""
    from tapa_megatron.launch.signals import StopRequest

    real_batches = trainer.micro_batches

    def micro_batches(dataset, index, *args, **kwargs):
        if index + 1 == at_step:
            os.kill(os.getpid(), signum)
        return real_batches(dataset, index, *args, **kwargs)

    trainer.micro_batches = micro_batches
    with StopRequest() as stop:
        result = trainer.train(cfg, report=lambda *_: None, stop_requested=stop)
    return {"losses": result.losses, "final": str(result.final_checkpoint), "preempted": result.preempted,
            "signal": stop.signal_name}
