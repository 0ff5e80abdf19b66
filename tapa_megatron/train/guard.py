"""The non-finite guard: a step whose loss or gradient norm is NaN or Inf never reaches a checkpoint.

The engines do not apply such an update (train/engine.py). The guard then stops the run, on every
rank after the same step and before anything is saved, so the checkpoints already written (the newest
good one included) stay as they are: a diverged run never rotates out a good checkpoint. With
training.skip_nonfinite_steps=N it instead skips up to N such steps per job (counted from the job's
start or resume, each one logged), as large runs do for rare loss spikes; step N+1 stops the run.
"""

import math

import torch
import torch.distributed as dist

from tapa_megatron.train import checkpoint_layout
from tapa_megatron.train.errors import RunError


class NonFiniteGuard:
    def __init__(self, cfg, device, report=print):
        self.cfg, self.device, self.report = cfg, device, report
        self.limit = cfg.training.skip_nonfinite_steps
        self.skipped = 0

    def check(self, step, result):
        """After step `step` (1-based) gave `result` (an engine StepResult): raise RunError to stop, or let a
        skipped step pass. Collective: every rank calls it and all take the same decision."""
        flags = torch.tensor([not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)), result.applied],
                             dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, applied = bool(flags[0]), bool(flags[1])
        if not bad:
            return
        what = f"step {step}: the loss is {result.loss} (gradient norm {result.grad_norm})"
        if not applied and self.skipped < self.limit:
            self.skipped += 1
            self.report(f"[guard] {what}: update skipped, {self.skipped} of at most {self.limit} this job "
                        "(training.skip_nonfinite_steps)")
            return
        newest = checkpoint_layout.newest_in_run(self.cfg.run_dir)
        kept = f"the newest checkpoint, {newest.name}, is untouched" if newest else "there is no checkpoint yet"
        skipped = (f"after skipping {self.skipped} such step(s) (training.skip_nonfinite_steps={self.limit})"
                   if self.limit else "")
        applied_note = " Megatron's optimizer had already applied its update." if applied else ""
        raise RunError(f"training stopped at {what}{' ' + skipped if skipped else ''}; nothing was saved after "
                       f"the last checkpoint and {kept}.{applied_note} Look for the cause (optimizer.lr is "
                       f"{self.cfg.optimizer.lr:g}; the data; model settings), or set training.skip_nonfinite_steps=N "
                       "to skip up to N such steps.")
