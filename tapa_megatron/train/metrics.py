"""What a run shows while it trains: one console line per logged step (step, loss, lr, grad norm,
tokens/s, TFLOP/s and MFU where the GPU's peak is known, ETA, a progress bar), validation losses, and
TensorBoard / Weights & Biases scalars under Megatron-LM's names ("lm loss", "lm loss validation",
"learning-rate", "grad-norm", "iteration-time", "throughput" in TFLOP/s per GPU, "mem-*-bytes"), plus
"consumed-tokens" and "tokens-per-second". Each logged step also rewrites RUN_DIR/progress.json (atomically),
which `tapa status` reads."""

import math
import os
import time
from pathlib import Path

import torch

from tapa_megatron.model.flops import PEAK_TFLOPS
from tapa_megatron.train.progress import PROGRESS_NAME, write_progress



def peak_tflops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _bar(done, total, width=20):
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Metrics:
    def __init__(self, run_dir, total_steps, tokens_per_step, flops_per_step, world_size, enabled, tensorboard=True,
                 wandb=None):
        self.total_steps, self.tokens_per_step, self.flops_per_step = total_steps, tokens_per_step, flops_per_step
        self.world_size, self.enabled = world_size, enabled
        self.peak = peak_tflops()
        self.progress_path = Path(run_dir) / PROGRESS_NAME
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.wandb = wandb if enabled else None  # a wandb Run (see wandb_run), or None
        self.last_time = None
        self.history = []

    def start(self):
        self.last_time = time.perf_counter()

    def log(self, step, loss, lr, grad_norm, steps_since_last):
        """step counts completed optimizer steps (1-based)."""
        now = time.perf_counter()
        seconds_per_step = (now - self.last_time) / max(steps_since_last, 1)
        self.last_time = now
        tokens_per_s = self.tokens_per_step / seconds_per_step
        tflops = self.flops_per_step / seconds_per_step / 1e12
        record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                      tflops_per_gpu=tflops / self.world_size)
        self.history.append(record)
        if not self.enabled:
            return record
        mfu = f" mfu {100 * tflops / self.world_size / self.peak:.1f}%" if self.peak else ""
        eta = _duration(seconds_per_step * (self.total_steps - step))
        write_progress(self.progress_path, {**record, "total_steps": self.total_steps, "seconds_per_step":
                                            seconds_per_step, "time": time.time(),
                                            "job_id": os.environ.get("SLURM_JOB_ID")})
        print(f"{_bar(step, self.total_steps)} step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3g} | "
              f"grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | {tflops:.3f} TFLOP/s{mfu} | ETA {eta}",
              flush=True)
        scalars = {"lm loss": loss, "learning-rate": lr, "grad-norm": grad_norm, "iteration-time": seconds_per_step,
                   "throughput": tflops / self.world_size, "tokens-per-second": tokens_per_s,
                   "consumed-tokens": step * self.tokens_per_step}
        if torch.cuda.is_available():
            scalars["mem-allocated-bytes"] = torch.cuda.memory_allocated()
            scalars["mem-max-allocated-bytes"] = torch.cuda.max_memory_allocated()
            scalars["mem-reserved-bytes"] = torch.cuda.memory_reserved()
        self._write(scalars, step)
        return record

    def log_validation(self, step, loss):
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 20.0))  # capped like Megatron-LM's, so an early huge loss stays printable
        print(f"[validation] step {step}/{self.total_steps} | lm loss validation {loss:.4f} | ppl {ppl:.2f}",
              flush=True)
        self._write({"lm loss validation": loss, "lm loss validation ppl": ppl}, step)

    def _write(self, scalars, step):
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.writer:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run(logging_cfg, run_dir, name, config_dict):
    """A Weights & Biases run when logging.wandb is set (rank 0 only); its files go under RUN_DIR/wandb.
    WANDB_MODE=offline works without a network (`wandb sync` uploads later)."""
    if not logging_cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("logging.wandb=true needs the wandb package: pip install 'tapa-megatron[wandb]'") from None
    return wandb.init(project=logging_cfg.wandb_project, name=name, dir=str(run_dir), config=config_dict)
