"""Continue a tapa-megatron run in Megatron-LM itself: `tapa convert megatron-lm --ckpt RUN --out DIR`.

Our checkpoints are already Megatron-Core `torch_dist` checkpoints with the model under "model" (what
Megatron-LM's GPTModel state dict uses). What Megatron-LM's `load_checkpoint` adds on top is a
directory layout and a few common-state keys:

    DIR/latest_checkpointed_iteration.txt     the step, as text
    DIR/iter_0000040/                         the checkpoint's files (hard links where possible)
        common.pt                             ours plus iteration, checkpoint_version, opt_param_scheduler

Then: `pretrain_gpt.py --load DIR --ckpt-format torch_dist --no-load-rng --no-load-optim ...` with the
run's model arguments (`tapa convert inspect` prints them). A RoPE run loads into Megatron-LM's own
GPTModel (local spec; tests/convert/test_megatron_lm.py loads it with Megatron-Core's own code). A TAPA
run needs our attention: a model_provider that calls tapa_megatron.model.build_gpt_model, since
Megatron-LM's TransformerConfig has no TAPA fields. The optimizer state is left out: the portable
engine stores Adam moments per parameter, not in the distributed optimizer's layout.
"""

import os
import shutil
from pathlib import Path

import torch

from tapa_megatron.convert import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"  # the file Megatron-LM's load_checkpoint reads first
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current state-dict layout version
LEFT_OUT = {"tapa_complete.json", "common.pt"}  # our completion marker; common.pt is rewritten


def iteration_dir(step):
    return f"iter_{step:07d}"  # Megatron-LM's naming (get_checkpoint_name)


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links refused
        shutil.copy2(source, target)


def convert(ckpt, out, overwrite=False):
    """Write a Megatron-LM load directory for checkpoint (or run directory) ckpt; returns its iter_ path."""
    from tapa_megatron.train import checkpoint

    try:
        source = checkpoint.resolve_checkpoint(ckpt)
    except FileNotFoundError as err:
        raise ConversionError(err) from None
    problems = checkpoint.verify(source)
    if problems:
        raise ConversionError(f"{source} is damaged ({problems[0]}); convert another checkpoint")
    common = checkpoint.load_common(source)
    step = int(common["train_state"]["step"])
    out = Path(out)
    target = out / iteration_dir(step)
    if target.exists():
        if not overwrite:
            raise ConversionError(f"{target} exists; pass --overwrite to replace it")
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name not in LEFT_OUT:
            _link_or_copy(file, target / file.name)
    common.update(iteration=step, checkpoint_version=CHECKPOINT_VERSION)
    if "scheduler" in common:  # the same class (OptimizerParamScheduler), so the same state dict
        common["opt_param_scheduler"] = common["scheduler"]
    torch.save(common, target / "common.pt")
    (out / TRACKER).write_text(str(step))
    return target
