"""What a run says when it ends: an end-of-run summary, and one clear line when there was nothing
left to train. Validation losses are kept in RUN_DIR/validation.jsonl (one line per evaluation, across
every job of the run), so the best one is known after a resume too."""

import json
import time
from pathlib import Path

VALIDATION_LOG = "validation.jsonl"


def record_validation(run_dir, step, loss):
    with open(Path(run_dir) / VALIDATION_LOG, "a") as log:
        log.write(json.dumps({"step": step, "loss": loss, "time": time.time()}) + "\n")


def read_validation(run_dir):
    """Every evaluation of the run, oldest first; a later evaluation of the same step (a rerun job) wins."""
    path = Path(run_dir) / VALIDATION_LOG
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def already_finished_line(name, steps, checkpoint):
    return (f"[train] {name} is already finished: step {steps} of {steps}, newest checkpoint {checkpoint}. "
            "Nothing to train; raise training.steps to continue it, or use a new run_dir to start again.")


def summary_lines(name, start_step, last_step, total_steps, tokens_per_step, seconds, final_loss, run_dir,
                  checkpoint):
    """The end-of-run summary: steps, tokens, time, last training loss, final and best validation loss,
    newest checkpoint."""
    steps = last_step - start_step
    tokens = steps * tokens_per_step
    rate = f", {tokens / seconds:,.0f} tok/s" if seconds > 0 and steps else ""
    lines = [f"[summary] {name}: steps {start_step}..{last_step} of {total_steps} this job "
             f"({steps} steps, {tokens:,} tokens, {_duration(seconds)}{rate}); "
             f"{last_step * tokens_per_step:,} tokens seen in all"]
    if final_loss is not None:
        lines.append(f"[summary] final training loss {final_loss:.4f}")
    validation = read_validation(run_dir)
    if validation:
        best = min(validation, key=lambda record: record["loss"])
        lines.append(f"[summary] validation loss {validation[-1]['loss']:.4f} at step {validation[-1]['step']}, "
                     f"best {best['loss']:.4f} at step {best['step']}")
    lines.append(f"[summary] newest checkpoint {checkpoint}")
    return lines
