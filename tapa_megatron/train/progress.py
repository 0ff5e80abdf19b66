"""RUN_DIR/progress.json: the last logged step (step, loss, tokens/s, seconds per step, ...), rewritten
atomically at every log line by the trainer and read by `tapa status` (plain JSON: no torch here)."""

import json
import os
from pathlib import Path

PROGRESS_NAME = "progress.json"


def write_progress(path, record):
    """Replace path with record as JSON in one rename, so a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


def read_progress(run_dir):
    """The last logged step's record (see Metrics.log), or None before the first log line."""
    path = Path(run_dir) / PROGRESS_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
