"""Run directories: one per run, holding config.yaml (the resolved config the trainer writes at every
start), checkpoints/, tensorboard/ and, for Slurm jobs, logs/.

Training or submitting again into a run directory that holds a run of the same recipe resumes it. One
that holds another recipe's run (another name, or another model) is refused with a message naming both,
unless forced; forcing keeps the old config.yaml beside as config.replaced-TIME.yaml, and the newest
checkpoint there is resumed.
"""

import time
from pathlib import Path

from tapa_megatron.config import ConfigError, read_yaml, to_dict
from tapa_megatron.train import checkpoint_layout

CONFIG_NAME = "config.yaml"


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_conflict(cfg):
    """Why cfg must not run in cfg.run_dir (another recipe's run is there), or None if it may."""
    saved_path = Path(cfg.run_dir) / CONFIG_NAME
    if not saved_path.is_file():
        return None
    try:
        saved = read_yaml(saved_path)
    except ConfigError as err:
        return f"run dir {cfg.run_dir} has an unreadable {CONFIG_NAME} ({err})"
    ours = to_dict(cfg)
    saved_identity = _flatten({"name": saved.get("name"), "model": saved.get("model") or {}})
    our_identity = _flatten({"name": ours["name"], "model": ours["model"]})
    differing = sorted(key for key in saved_identity.keys() | our_identity.keys()
                       if saved_identity.get(key) != our_identity.get(key))
    if not differing:
        return None
    return (f"run dir {cfg.run_dir} holds a run of recipe {saved.get('name')!r} ({saved_path}), and this is "
            f"recipe {cfg.name!r}; they differ in {', '.join(differing[:6])}"
            f"{' ...' if len(differing) > 6 else ''}")


def set_aside_config(run_dir):
    """Keep a forced-over run's config.yaml as config.replaced-TIME.yaml (nothing is deleted)."""
    saved_path = Path(run_dir) / CONFIG_NAME
    kept = saved_path.with_name(f"config.replaced-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    saved_path.rename(kept)
    return kept


def describe(run_dir):
    """What a run in run_dir will do: start afresh, or resume from its newest complete checkpoint."""
    latest = checkpoint_layout.newest_in_run(run_dir)
    return "a new run" if latest is None else f"resumes from {latest.name}"
