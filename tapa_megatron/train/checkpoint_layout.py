"""Where a run's checkpoints are on disk and which of them are complete: names, the completion marker,
listing. Plain files only (no torch, no Megatron), so that `tapa status` reads a run directory at once;
checkpoint.py writes and loads what this finds.
"""

import re
from pathlib import Path

MARKER = "tapa_complete.json"
PARTIAL_SUFFIX = ".partial"
DAMAGED_SUFFIX = ".damaged"  # a checkpoint that failed verification, set aside (never deleted by us)
REMOVING_SUFFIX = ".removing"  # an old checkpoint being deleted by the rotation
CHECKPOINT_NAME = re.compile(r"step_(\d+)")


def checkpoint_name(step):
    return f"step_{step:08d}"


def checkpoint_root(run_dir):
    return Path(run_dir) / "checkpoints"


def is_complete(path):
    return (Path(path) / MARKER).is_file()


def list_checkpoints(root):
    """(complete, incomplete) checkpoint directories under root, complete ones sorted by step. Directories
    set aside (.damaged) or being deleted (.removing) are neither."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    complete, incomplete = [], []
    for path in sorted(root.iterdir(), key=step_of):
        if not path.is_dir():
            continue
        if CHECKPOINT_NAME.fullmatch(path.name):
            (complete if is_complete(path) else incomplete).append(path)
        elif CHECKPOINT_NAME.fullmatch(path.name.removesuffix(PARTIAL_SUFFIX)):
            incomplete.append(path)
    return complete, incomplete


def step_of(path):
    match = CHECKPOINT_NAME.match(path.name)
    return (int(match.group(1)) if match else -1, path.name)


def report_incomplete(incomplete, report):
    for path in incomplete:
        report(f"[checkpoint] ignoring incomplete checkpoint {path} (no {MARKER}: the run stopped while saving)")


def latest_checkpoint(root, report=print):
    """The newest complete checkpoint under root (None if there is none), unverified; incomplete ones are
    reported. A resume takes latest_verified_checkpoint."""
    complete, incomplete = list_checkpoints(root)
    report_incomplete(incomplete, report)
    return complete[-1] if complete else None


def newest_in_run(run_dir):
    """The newest complete checkpoint of a run directory (None if there is none), unverified, quietly."""
    return latest_checkpoint(checkpoint_root(run_dir), report=lambda _: None)


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
