"""tapa status RUN_DIR: where a run stands, read from its run directory, and its Slurm jobs' states when
Slurm's commands are there.

    tapa status runs/tiny-cpu            one run
    tapa status runs/chain               a chain's parent directory: each stage, in the order it was submitted
    tapa status runs/tiny-cpu --json

From the run directory alone: config.yaml (recipe name, training.steps), progress.json (the trainer rewrites
it at every logged step: step, loss, tokens/s, seconds per step), validation.jsonl, the newest complete
checkpoint, and the jobs `tapa submit` kept there (logs/slurm-JOBID.sbatch) with how each job's log says it
ended. With Slurm: each job's state from squeue (queued, running, recently ended) or sacct (older ones).
"""

import json
import time
from pathlib import Path

from tapa_megatron.config import ConfigError, read_yaml
from tapa_megatron.launch import rundir, slurm
from tapa_megatron.train import checkpoint_layout, summary
from tapa_megatron.train.progress import PROGRESS_NAME, read_progress

# The last line the batch script (slurm/train.sbatch) writes into a job's log says how the job ended.
LOG_OUTCOMES = (("training finished", "finished"), ("requeueing job", "requeued to resume"),
                ("checkpointed and stopped on SIGTERM", "stopped on SIGTERM, checkpointed"),
                ("training failed", "failed"), ("requeue failed", "requeue failed"))


class StatusError(ValueError):
    pass


def is_run_dir(path):
    path = Path(path)
    return any((path / name).exists() for name in (rundir.CONFIG_NAME, "checkpoints", "logs", PROGRESS_NAME))


def _job_ids(run_dir):
    ids = (path.stem.removeprefix("slurm-") for path in (Path(run_dir) / "logs").glob("slurm-*.sbatch"))
    return sorted((job_id for job_id in ids if job_id.isdigit()), key=int)


def _log_outcome(log):
    """How a job's log says it ended (or where it is), from the batch script's [slurm] lines."""
    if not log.is_file():
        return "no log yet"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("[slurm]")]
    for line in reversed(lines):
        for text, outcome in LOG_OUTCOMES:
            if text in line:
                return outcome
    return "started" if lines else "no [slurm] line yet"


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_status(run_dir, with_slurm=None, now=None):
    """Everything known about the run in run_dir, as a dict (what --json prints)."""
    run_dir = Path(run_dir).absolute()
    now = time.time() if now is None else now
    try:
        config = read_yaml(run_dir / rundir.CONFIG_NAME)
    except ConfigError:
        config = {}  # submitted, not started yet (or not a run of ours): say what else is there
    total = (config.get("training") or {}).get("steps")
    progress = read_progress(run_dir)
    newest = checkpoint_layout.newest_in_run(run_dir)
    checkpoint_step = checkpoint_layout.step_of(newest)[0] if newest is not None else None
    step = max(progress["step"] if progress else 0, checkpoint_step or 0)
    status = dict(run_dir=str(run_dir), name=config.get("name") or run_dir.name, step=step, total_steps=total,
                  finished=bool(total) and checkpoint_step is not None and checkpoint_step >= total,
                  newest_checkpoint=str(newest) if newest else None, checkpoint_step=checkpoint_step,
                  loss=None, loss_step=None, tokens_per_s=None, seconds_per_step=None, updated_seconds_ago=None,
                  eta_seconds=None, validation=None, jobs=[])
    if progress:
        status.update(loss=progress["loss"], loss_step=progress["step"], tokens_per_s=progress["tokens_per_s"],
                      seconds_per_step=progress["seconds_per_step"], updated_seconds_ago=now - progress["time"])
        total = total or progress["total_steps"]
        status["total_steps"] = total
    if status["seconds_per_step"] and total and not status["finished"]:
        status["eta_seconds"] = status["seconds_per_step"] * (total - step)
    validation = summary.read_validation(run_dir)
    if validation:
        best = min(validation, key=lambda record: record["loss"])
        status["validation"] = dict(loss=validation[-1]["loss"], step=validation[-1]["step"], best_loss=best["loss"],
                                    best_step=best["step"])
    ids = _job_ids(run_dir)
    if with_slurm is None:
        with_slurm = slurm.available()
    states = {}
    if with_slurm and ids:
        try:
            states = slurm.job_states(ids)
        except slurm.SlurmError as err:
            status["slurm_error"] = str(err)
    for job_id in ids:
        log = run_dir / "logs" / f"slurm-{job_id}.out"
        state, elapsed, reason = states.get(job_id, (None, None, None))
        status["jobs"].append(dict(id=job_id, state=state, elapsed=elapsed, reason=reason or None,
                                   log=str(log), log_says=_log_outcome(log)))
    return status


def format_status(status):
    lines = [f"{status['name']}  {status['run_dir']}"]
    total = status["total_steps"]
    share = f" ({100 * status['step'] / total:.0f}%)" if total else ""
    state = "finished" if status["finished"] else "not finished"
    lines.append(f"  step        {status['step']} of {total or '?'}{share}, {state}")
    if status["loss"] is not None:
        lines.append(f"  last loss   {status['loss']:.4f} at step {status['loss_step']}, logged "
                     f"{_duration(status['updated_seconds_ago'])} ago")
        lines.append(f"  speed       {status['tokens_per_s']:,.0f} tok/s, {status['seconds_per_step']:.3g} s/step")
    else:
        lines.append("  last loss   none logged yet (no progress.json)")
    if status["eta_seconds"] is not None:
        lines.append(f"  ETA         {_duration(status['eta_seconds'])} of training left at that speed "
                     f"({total - status['step']} steps; queue time not counted)")
    if status["validation"]:
        v = status["validation"]
        lines.append(f"  validation  {v['loss']:.4f} at step {v['step']}, best {v['best_loss']:.4f} at step "
                     f"{v['best_step']}")
    newest = status["newest_checkpoint"]
    lines.append(f"  checkpoint  {newest} (step {status['checkpoint_step']})" if newest else
                 "  checkpoint  none complete yet")
    if "slurm_error" in status:
        lines.append(f"  slurm       did not answer: {status['slurm_error']}")
    for job in status["jobs"]:
        if job["state"] is None:
            known = "not known to Slurm now" if "slurm_error" not in status else "state unknown"
        else:
            known = job["state"] + (f" ({job['reason']})" if job["reason"] else "") + \
                (f", elapsed {job['elapsed']}" if job["elapsed"] else "")
        lines.append(f"  job {job['id']:<8}{known}; log says: {job['log_says']}  ({job['log']})")
    if not status["jobs"]:
        lines.append("  jobs        none submitted with tapa submit")
    return "\n".join(lines)


def stage_dirs(path):
    """The run directories to report: path itself, or the stages under a chain's parent directory, in the
    order they were submitted (first job id; stages without jobs by name, after)."""
    path = Path(path)
    if not path.is_dir():
        raise StatusError(f"{path} is not a directory: give a run directory (it holds config.yaml, checkpoints/ "
                          "or logs/) or a chain's parent directory (tapa submit --chain ... --run-dir PARENT).")
    if is_run_dir(path):
        return [path]
    stages = [child for child in path.iterdir() if child.is_dir() and is_run_dir(child)]
    if not stages:
        raise StatusError(f"{path} is not a run directory (no config.yaml, checkpoints/ or logs/) and holds none.")

    def submitted(stage):
        ids = _job_ids(stage)
        return (0, int(ids[0]), stage.name) if ids else (1, 0, stage.name)

    return sorted(stages, key=submitted)


def run(path, as_json=False, with_slurm=None):
    statuses = [run_status(stage, with_slurm=with_slurm) for stage in stage_dirs(path)]
    if as_json:
        print(json.dumps(statuses if len(statuses) > 1 else statuses[0], indent=1))
        return statuses
    print("\n\n".join(format_status(status) for status in statuses))
    return statuses
