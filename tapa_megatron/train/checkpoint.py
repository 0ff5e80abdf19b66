"""Checkpoints in Megatron's dist_checkpointing format (torch_dist), written so a crash never costs a
good one.

    RUN/checkpoints/step_00000040/      metadata.json, *.distcp, common.pt (Megatron's layout)
                                        tapa_complete.json: written last; no marker, no checkpoint
    RUN/checkpoints/latest              name of the newest complete checkpoint

A checkpoint is written into `step_N.partial/` by every rank, then, once all ranks are done, rank 0
adds the marker and renames the directory into place. Loading only ever considers directories with
the marker; leftovers of a crash are reported and skipped. A step that already has a complete
checkpoint is never rewritten.

Model and optimizer state are sharded tensors (reshardable across TP/PP layouts); the scheduler,
step, consumed samples and resolved config are common state; RNG states are per rank.
"""

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

MARKER = "tapa_complete.json"
PARTIAL_SUFFIX = ".partial"


class SynchronousTorchDistSave(SaveShardedStrategy):
    """Megatron's torch_dist format written synchronously with torch.distributed.checkpoint.

    Megatron's own torch_dist writer pins memory and calls torch.cuda.synchronize(), which a CPU-only
    PyTorch cannot; this strategy writes the same format (Megatron's loader reads it) without CUDA.
    """

    def __init__(self):
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir):
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        dcp.save(mcore_to_pyt_state_dict(state, False), storage_writer=dcp.FileSystemWriter(checkpoint_dir),
                 planner=MCoreSavePlanner(flatten_state_dict=False))

    def can_handle_sharded_objects(self):
        return True


def checkpoint_name(step):
    return f"step_{step:08d}"


def checkpoint_root(run_dir):
    return Path(run_dir) / "checkpoints"


def is_complete(path):
    return (Path(path) / MARKER).is_file()


def list_checkpoints(root):
    """(complete, incomplete) checkpoint directories under root, complete ones sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    complete, incomplete = [], []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or not path.name.startswith("step_"):
            continue
        (complete if is_complete(path) and not path.name.endswith(PARTIAL_SUFFIX) else incomplete).append(path)
    return complete, incomplete


def latest_checkpoint(root, report=print):
    """The newest complete checkpoint under root (None if there is none); incomplete ones are reported."""
    complete, incomplete = list_checkpoints(root)
    for path in incomplete:
        report(f"[checkpoint] ignoring incomplete checkpoint {path} (no {MARKER}: the run stopped while saving)")
    return complete[-1] if complete else None


def resolve_checkpoint(path):
    """A checkpoint directory, or a run directory / checkpoints directory (then its newest complete one)."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root, report=lambda _: None)
        if found is not None:
            return found
    raise FileNotFoundError(f"No complete checkpoint at {path}: give a checkpoint directory (step_N with "
                            f"{MARKER}) or a run directory that has one.")


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _layout():
    """This rank's grid: (pipeline, tensor, context, data) sizes."""
    ps = parallel_state
    return [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_context_parallel_world_size(), ps.get_data_parallel_world_size()]


def _rng_sharded_object(state):
    """One RNG state per rank, addressed by its (pipeline, tensor, context, data) coordinates."""
    ps = parallel_state
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_context_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, tuple(_layout()), offset, replica_id=0)


def _sharded_state(model, engine, is_loading, with_optimizer=True, with_rng=True):
    model_state = model.sharded_state_dict()
    state = {"model": model_state}
    if with_rng:
        state["rng_state"] = _rng_sharded_object(_rng_state())
    if with_optimizer:
        state["optimizer"] = engine.optimizer_sharded_state_dict(model_state, is_loading=is_loading)
    return state


def save_checkpoint(run_dir, step, model, engine, consumed_samples, config_dict, keep=2, report=print):
    """Save step's checkpoint (collective: every rank calls it; each reports through `report`). Returns its path."""
    root = checkpoint_root(run_dir)
    final = root / checkpoint_name(step)
    if is_complete(final):
        return final
    partial = root / (checkpoint_name(step) + PARTIAL_SUFFIX)
    if dist.get_rank() == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    started = time.time()
    state = _sharded_state(model, engine, is_loading=False)
    state.update(scheduler=engine.scheduler.state_dict(), config=config_dict, layout=_layout(),
                 train_state={"step": step, "consumed_samples": consumed_samples})
    strategy = None if torch.cuda.is_available() else SynchronousTorchDistSave()
    dist_checkpointing.save(state, str(partial), sharded_strategy=strategy)
    dist.barrier()
    if dist.get_rank() == 0:
        (partial / MARKER).write_text(json.dumps({"step": step, "consumed_samples": consumed_samples,
                                                  "world_size": dist.get_world_size(), "saved_at": time.time()}))
        os.replace(partial, final)
        _write_atomically(root / "latest", final.name)
        _remove_old(root, keep)
    dist.barrier()
    report(f"[checkpoint] saved {final} in {time.time() - started:.1f}s (keeping the newest {keep})")
    return final


def _write_atomically(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_old(root, keep):
    complete, _ = list_checkpoints(root)
    for path in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(path)


def load_common(path):
    """The common (non-sharded) part of a checkpoint: config, train_state, scheduler."""
    return dist_checkpointing.load_common_state_dict(str(path))


def load_checkpoint(path, model, engine, with_optimizer=True, report=print):
    """Load model (and optimizer, scheduler, RNG) state. Returns the train_state dict.

    Model and optimizer state reshard to this rank's layout; RNG states are per rank and are restored
    only when the layout is the one they were saved at."""
    saved_layout = load_common(path).get("layout")
    with_rng = with_optimizer and saved_layout == _layout()
    if with_optimizer and not with_rng:
        report(f"[checkpoint] {path} was saved at layout (pp, tp, cp, dp) = {saved_layout}, loading at {_layout()}: "
               "model and optimizer reshard, RNG states start fresh")
    state = _sharded_state(model, engine, is_loading=True, with_optimizer=with_optimizer, with_rng=with_rng)
    loaded = dist_checkpointing.load(state, str(path))
    # Megatron's linears carry an `_extra_state` slot (used by fp8) that the sharded format omits.
    result = model.load_state_dict(loaded["model"], strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    if with_optimizer:
        engine.load_optimizer_state_dict(loaded["optimizer"])
        engine.scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return loaded["train_state"]
