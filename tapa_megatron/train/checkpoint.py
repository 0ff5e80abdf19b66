"""Checkpoints in Megatron's dist_checkpointing format (torch_dist), written so a crash never costs a
good one.

    RUN/checkpoints/step_00000040/      metadata.json, *.distcp, common.pt (Megatron's layout)
                                        tapa_complete.json: written last; no marker, no checkpoint
    RUN/checkpoints/latest              name of the newest complete checkpoint

A checkpoint is written into `step_N.partial/` by every rank, then, once all ranks are done, rank 0
adds the marker and renames the directory into place. Loading only ever considers directories with
the marker; leftovers of a crash are reported and skipped. A step that already has a complete
checkpoint is never rewritten.

The marker holds the size and SHA-256 of every file of the checkpoint (`sha256sum` checks them by
hand), hashed by all ranks in shares. A resume verifies its checkpoint first: a damaged newest one is
reported and the newest one that verifies is loaded; nothing is deleted for it (when the run comes to
save that step again, the damaged directory is set aside as `step_N.damaged`). A save that would not
fit on the disk is refused before anything is written; one that fails anyway removes its own partial
files. Old checkpoints are renamed `step_N.removing` before they are deleted, so a crash mid-delete
never leaves a complete-looking checkpoint with files missing.

Model and optimizer state are sharded tensors (reshardable across TP/PP layouts); the scheduler,
step, consumed samples and resolved config are common state; RNG states are per rank.
"""

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica
from tapa_megatron.megatron_compat import save_strategy
from tapa_megatron.train.checkpoint_layout import (
    DAMAGED_SUFFIX,
    MARKER,
    PARTIAL_SUFFIX,
    REMOVING_SUFFIX,
    checkpoint_name,
    checkpoint_root,
    is_complete,
    list_checkpoints,
    resolve_checkpoint,
    report_incomplete,
    step_of,
)
from tapa_megatron.train.errors import RunError

MIB = 2**20


def _share():
    """(rank, world size) for work shared out over the ranks; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(value):
    """Rank 0's value of a picklable object, on every rank."""
    if _share()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(value):
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if _share()[1] == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_checksums(directory):
    """{relative path: {"size", "sha256"}} for every file under directory except the marker. Collective
    inside torch.distributed: rank 0 lists the files, rank r hashes every world-size-th one from the r-th."""
    directory = Path(directory)
    names = _from_rank0(sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                               if p.is_file() and p != directory / MARKER))
    rank, world = _share()
    mine = {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in names[rank::world]}
    return {name: entry for part in _gathered(mine) for name, entry in part.items()}


def write_marker(directory, info, checksums):
    """The completion marker: info (step, consumed samples, ...) and the checksums of every file."""
    (Path(directory) / MARKER).write_text(json.dumps({**info, "files": checksums}, indent=1))


def _expected_checksums(path):
    """(the marker's checksums or None, what is wrong with the marker or None)."""
    try:
        return json.loads((Path(path) / MARKER).read_text()).get("files"), None
    except (OSError, ValueError, AttributeError) as err:
        return None, f"its {MARKER} is unreadable ({err})"


def verify(path):
    """What is wrong with checkpoint `path` against the checksums in its marker: [] if it verifies, None if
    its marker holds no checksums (written before they were added). Collective inside torch.distributed
    (the files are shared out for hashing); every rank gets the whole answer."""
    path = Path(path)
    rank, world = _share()
    expected, unreadable = _from_rank0(_expected_checksums(path) if rank == 0 else None)
    if unreadable:
        return [unreadable]
    if expected is None:
        return None
    problems = []
    for name in sorted(expected)[rank::world]:
        file, want = path / name, expected[name]
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, {want['size']} were written (truncated?)")
        elif _sha256(file) != want["sha256"]:
            problems.append(f"{name} does not match its SHA-256 (its bytes changed after it was written)")
    return sorted(problem for part in _gathered(problems) for problem in part)


def _describe_damage(path, problems):
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    return f"{path} is damaged: {'; '.join(problems[:2])}{more}"


def latest_verified_checkpoint(root, report=print):
    """The newest complete checkpoint under root that verifies (None if there is none). A damaged one is
    reported and the one before it is tried; damaged ones are never deleted. Collective: every rank calls it.
    Raises RunError when there are checkpoints and none of them verifies."""
    complete, incomplete = list_checkpoints(root)
    report_incomplete(incomplete, report)
    damaged = []
    for path in reversed(complete):
        problems = verify(path)
        if problems:
            report(f"[checkpoint] {_describe_damage(path, problems)}; left as it is, trying the one before")
            damaged.append(path.name)
            continue
        if problems is None:
            report(f"[checkpoint] {path} has no checksums (written by an earlier tapa-megatron): loaded unverified")
        if damaged:
            report(f"[checkpoint] falling back to {path.name}, the newest checkpoint that verifies")
        return path
    if damaged:
        raise RunError(f"no checkpoint in {root} verifies ({', '.join(damaged)}: damaged, see above); nothing was "
                       "deleted. Restore them from a copy, or move them out of the way to start this run afresh.")
    return None


def resolve_verified(path, what="checkpoint.init_from"):
    """resolve_checkpoint(path), verified (collective); RunError if it is missing or damaged."""
    try:
        found = resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise RunError(f"{what}={path}: {err}") from None
    problems = verify(found)
    if problems:
        raise RunError(f"{what}: {_describe_damage(found, problems)}. Restore it, or name an older checkpoint "
                       f"directory ({found.parent}/step_N) if you mean to start from that one.")
    return found


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


def _bytes_to_write(state):
    """What saving state writes, over all ranks: the main replica of every sharded tensor (collective)."""
    local = sum(t.data.numel() * t.data.element_size() for t in nested_values(state)
                if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id))
    total = torch.tensor([float(local)], dtype=torch.float64)
    dist.all_reduce(total)
    return int(total.item())


def _resume_hint(root):
    complete, _ = list_checkpoints(root)
    return f"resumes from {complete[-1].name}" if complete else "starts from the beginning (no checkpoint yet)"


def _check_space(root, final, needed, keep):
    """Refuse (on every rank, before anything is written) a save that the disk cannot hold."""
    free = shutil.disk_usage(root).free if dist.get_rank() == 0 else 0
    free = _from_rank0(free)
    margin = MIB + needed // 100  # metadata, common state, filesystem blocks
    if free < needed + margin:
        raise RunError(f"checkpoint {final.name} needs about {(needed + margin) / MIB:.1f} MiB but the filesystem of "
                       f"{root} has {free / MIB:.1f} MiB free: nothing was written. Free space there, lower "
                       f"checkpoint.keep (now {keep}; old ones are removed only after a new one is complete), or "
                       f"move run_dir; the same command then {_resume_hint(root)}.")


def _out_of_space(err, root):
    """Whether a failed save ran out of disk: ENOSPC anywhere in the error (torch's CheckpointException keeps
    each rank's), or hardly any space left (torch.save's zip writer reports a full disk without an errno)."""
    pending, seen = [err], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict):
            pending += [failure[0] for failure in failures.values() if isinstance(failure, tuple)]
        pending += [error.__cause__, error.__context__]
    usage = shutil.disk_usage(root)
    return usage.free < min(64 * MIB, usage.total // 100)


def _set_aside_if_damaged(final, report):
    """An existing complete checkpoint of this step is kept if it verifies; a damaged one is moved aside
    (renamed, not deleted) so the step can be written again. Collective. Returns whether final is good."""
    problems = verify(final)
    if not problems:
        return True
    aside = final.with_name(final.name + DAMAGED_SUFFIX)
    if dist.get_rank() == 0:
        index = 1
        while aside.exists():
            index += 1
            aside = final.with_name(f"{final.name}{DAMAGED_SUFFIX}-{index}")
        os.rename(final, aside)
    dist.barrier()
    report(f"[checkpoint] {_describe_damage(final, problems)}; set aside as {aside.name} and written again")
    return False


def save_checkpoint(run_dir, step, model, engine, consumed_samples, config_dict, keep=2, report=print, identity=None):
    """Save step's checkpoint (collective: every rank calls it; each reports through `report`). Returns its path.

    identity: what a resume checks the checkpoint against (tokenizer hash, vocabulary; train/compat.py)."""
    root = checkpoint_root(run_dir)
    final = root / checkpoint_name(step)
    if is_complete(final) and _set_aside_if_damaged(final, report):
        _finish(root, step, keep, report)  # e.g. a crash came after its rename, before the rest
        return final
    partial = root / (checkpoint_name(step) + PARTIAL_SUFFIX)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    started = time.time()
    state = _sharded_state(model, engine, is_loading=False)
    _check_space(root, final, _bytes_to_write(state), keep)
    state.update(scheduler=engine.scheduler.state_dict(), config=config_dict, layout=_layout(),
                 train_state={"step": step, "consumed_samples": consumed_samples})
    if identity is not None:
        state["identity"] = identity
    try:
        if dist.get_rank() == 0:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir()
        dist.barrier()
        dist_checkpointing.save(state, str(partial), sharded_strategy=save_strategy())
        dist.barrier()
        checksums = file_checksums(partial)
        failure = None
        if dist.get_rank() == 0:
            try:
                write_marker(partial, {"step": step, "consumed_samples": consumed_samples,
                                       "world_size": dist.get_world_size(), "saved_at": time.time()}, checksums)
                os.replace(partial, final)
            except OSError as err:
                failure = err
        failure = _from_rank0(failure)
        if failure is not None:
            raise failure
    except BaseException as err:  # torch's CheckpointException is a BaseException
        full = not final.exists() and _out_of_space(err, root)  # before the partial files give space back
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if full:
            free = shutil.disk_usage(root).free
            raise RunError(f"no space left on the filesystem of {root} while writing checkpoint {final.name}: its "
                           f"partial files were removed ({free / MIB:.1f} MiB free again) and the earlier checkpoints "
                           f"are untouched. Free space there, lower checkpoint.keep (now {keep}), or move run_dir; "
                           f"the same command then {_resume_hint(root)}.") from None
        raise
    _finish(root, step, keep, report)
    report(f"[checkpoint] saved {final} in {time.time() - started:.1f}s (keeping the newest {keep})")
    return final


def finish_rotation(run_dir, step, keep, report=print):
    """Complete what a save of `step` would have finished after it (collective): for a rerun of a run
    whose last save was interrupted after its rename, mid-rotation."""
    _finish(checkpoint_root(run_dir), step, keep, report)


def _finish(root, step, keep, report):
    """Rotate old checkpoints out and point `latest` at the newest (rank 0; collective)."""
    if dist.get_rank() == 0:
        _remove_old(root, keep, step)
        try:
            _write_atomically(root / "latest", list_checkpoints(root)[0][-1].name)
        except OSError as err:  # `latest` is for people; loading lists the directories
            report(f"[checkpoint] could not update {root / 'latest'} ({err})")
    dist.barrier()


def _write_atomically(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_old(root, keep, saved_step):
    """Delete all but the newest `keep` complete checkpoints (keep 0 keeps all), each renamed first, so that a
    crash mid-delete leaves a .removing directory, never a checkpoint with files missing. Leftovers of
    earlier crashes go too: .removing directories and the .partial ones of earlier steps."""
    complete, incomplete = list_checkpoints(root)
    for path in complete[:-keep] if keep > 0 else []:
        doomed = path.with_name(path.name + REMOVING_SUFFIX)
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    for path in root.glob(f"step_*{REMOVING_SUFFIX}"):
        shutil.rmtree(path)
    for path in incomplete:
        if path.name.endswith(PARTIAL_SUFFIX) and step_of(path)[0] < saved_step:
            shutil.rmtree(path)


def load_common(path):
    """The common (non-sharded) part of a checkpoint: config, train_state, scheduler."""
    return dist_checkpointing.load_common_state_dict(str(path))


def load_checkpoint(path, model, engine, with_optimizer=True, with_schedule=True, report=print):
    """Load model (and optimizer, scheduler, RNG) state. Returns the train_state dict.

    with_optimizer=False (an extension): weights only, and the optimizer refreshes its own copies of
    them (Megatron's mixed-precision optimizers keep fp32 main params made at construction).
    with_schedule=False: the optimizer state but not the lr schedule's position (an extension that
    keeps the moments but starts the recipe's schedule at step 0).

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
    elif engine is not None:  # weights only (eval and convert load without an engine)
        engine.reload_model_params()
    if with_optimizer and with_schedule:
        engine.scheduler.load_state_dict(loaded["scheduler"])
    elif with_optimizer:  # the loaded param groups carry the checkpoint's lr and weight decay: set the recipe's
        engine.scheduler.step(0)
    if with_rng:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return loaded["train_state"]
