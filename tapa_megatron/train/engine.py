"""One optimizer step over a model stage: forward/backward over micro-batches, gradient reduction,
clipping, the update. Two engines with one interface, one forward step and one loss function
(step.py), and Megatron-Core's own schedule and gradient finalisation wherever they run.

The CPU/GPU seam, all of it (megatron-core 0.16):

| part                         | MegatronEngine (GPU)                  | PortableEngine (CPU)                         |
|------------------------------|---------------------------------------|----------------------------------------------|
| forward step, loss (3-tuple) | step.forward_step / step.loss_func    | the same                                     |
| schedule, pipeline = 1       | forward_backward_no_pipelining        | the same, under CudaCountersOnCpu            |
| schedule, pipeline > 1       | Megatron's 1F1B (p2p on CUDA)         | pipeline.py's GPipe over gloo send/recv      |
| gradient finalisation        | finalize_model_grads                  | the same, over PortableDataParallel          |
| data-parallel gradients      | DistributedDataParallel (CUDA buffers)| PortableDataParallel (one all-reduce)        |
| optimizer, clipping          | distributed optimizer (CUDA)          | torch AdamW, Megatron's param groups, TP-aware norm |

Everything below the schedule (the model, TAPA, context parallelism) is the same code on both.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from torch.overrides import TorchFunctionMode

from tapa_megatron.train import pipeline, step
from tapa_megatron.train.grad_groups import GradGroups

# What Megatron-LM's checkpointing asks of the distributed optimizer (the non-deprecated format).
DISTRIBUTED_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class StepResult:
    loss: float  # mean over the global batch's tokens (same on every rank)
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    applied: bool = True  # False: the loss or gradient norm was NaN/Inf and the update was not applied (guard.py)
    grad_norms: dict | None = None  # {parameter group: norm} before clipping, with training.grad_norm_groups


def lr_scheduler(optimizer, cfg):
    """Megatron's scheduler: linear warm-up, then cosine/linear decay to min_lr_ratio * lr at the last step.

    The recipe's schedule wins over a checkpoint's (override_opt_param_scheduler): a resumed or
    extended run with another lr or length follows the recipe; only the step count is restored."""
    o = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.lr * o.min_lr_ratio, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.training.steps, o.warmup_steps + 1), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(cfg.training.steps, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def param_groups(model, weight_decay):
    """Megatron's default grouping: no weight decay on biases and 1-D parameters (the norms). The
    scheduler sets each group's decay to its wd_mult times the schedule's, as Megatron's groups do."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]


class CudaCountersOnCpu(TorchFunctionMode):
    """The seam's only adapter: megatron-core 0.16's forward_backward_no_pipelining allocates its token
    counter with device="cuda" unconditionally; inside this mode such allocations land on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class PortableDataParallel(torch.nn.Module):
    """What finalize_model_grads and the schedules ask of Megatron's DistributedDataParallel, without
    its CUDA gradient buffers: gradients averaged over the data- and context-parallel ranks in one
    all-reduce (each rank's loss is already the mean over its own tokens, step.py)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.config = module, module.config
        self.ddp_config = DistributedDataParallelConfig()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return nullcontext()

    def finish_grad_sync(self, force_all_reduce=False):
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        size = dist.get_world_size(group)
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= size
        for grad, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(chunk.view_as(grad))

    def scale_gradients(self, scaling):
        for param in self.module.parameters():
            if param.grad is not None:
                param.grad.mul_(scaling)


def _schedule_lengths(cfg):
    """seq_length and micro_batch_size for Megatron's schedules: the whole sequence (they divide by the
    context-parallel size themselves)."""
    return cfg.data.seq_length, cfg.training.micro_batch_size


class PortableEngine:
    def __init__(self, model, cfg, activation_shape, dtype):
        self.cfg, self.activation_shape, self.dtype = cfg, activation_shape, dtype
        self.model = PortableDataParallel(model)
        model.config.finalize_model_grads_func = finalize_model_grads
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.scheduler.step(0)
        self.grad_groups = GradGroups(model) if cfg.training.grad_norm_groups else None

    def forward_backward(self, micro_batches, forward_only=False):
        """Gradients of the global batch's mean loss in the parameters (none with forward_only); the
        schedule's per-micro-batch logs."""
        if not forward_only:
            self.optimizer.zero_grad(set_to_none=True)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            return pipeline.forward_backward(self.model, micro_batches, self.activation_shape, self.dtype,
                                             forward_only=forward_only)
        seq_length, micro_batch_size = _schedule_lengths(self.cfg)
        with CudaCountersOnCpu():
            return get_forward_backward_func()(
                forward_step_func=step.forward_step, data_iterator=iter(micro_batches), model=[self.model],
                num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
                forward_only=forward_only)

    def _grad_norm(self):
        """L2 norm of the whole model's gradient: each tensor-parallel shard counted once, every stage."""
        squares = torch.zeros((), dtype=torch.float64)
        for param in self.model.parameters():
            if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                squares += param.grad.double().square().sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return math.sqrt(squares.item())

    def train_step(self, micro_batches):
        logs = self.forward_backward(micro_batches)
        grad_norm = self._grad_norm()
        grad_norms = self.grad_groups.norms() if self.grad_groups else None
        loss, lr = step.global_mean_loss(logs, device="cpu"), self.lr
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same on every rank: both are global
            return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, applied=False, grad_norms=grad_norms)
        clip = self.cfg.optimizer.clip_grad
        if clip > 0 and grad_norm > clip:
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(clip / (grad_norm + 1e-6))
        self.optimizer.step()
        self.scheduler.step(1)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, grad_norms=grad_norms)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def reload_model_params(self):
        """Nothing to do: torch's optimizer updates the parameters themselves, not copies of them."""

    def optimizer_sharded_state_dict(self, model_sharded_state_dict, is_loading=False):
        """Adam moments as sharded tensors laid out like their parameters (reshardable), as Megatron's
        FP32Optimizer does it."""
        parameters = [param for group in self.optimizer.param_groups for param in group["params"]]  # state ids
        if is_loading and not self.optimizer.state:  # materialise the moments so there is a layout to load into
            for param in parameters:
                self.optimizer.state[param] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(param),
                                               "exp_avg_sq": torch.zeros_like(param)}
        state = self.optimizer.state_dict()
        id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, parameters)
        steps = {float(s["step"]) for s in state["state"].values()}
        optim_state_to_sharding_state(state, id_to_sharded, exclude_keys="step")
        for param_state in state["state"].values():
            param_state.pop("step", None)
        state["state"]["common_step"] = steps.pop() if steps else 0.0
        return state

    def load_optimizer_state_dict(self, state):
        step_count = state["state"].pop("common_step")
        for param_state in state["state"].values():
            param_state["step"] = torch.tensor(float(step_count))
        self.optimizer.load_state_dict(state)


class MegatronEngine:
    """GPU: Megatron-Core DDP (overlapped gradient reduce), distributed optimizer, pipeline schedules.

    Runs on GPU only; `tapa selfcheck` compares it with PortableEngine on the same GPU."""

    def __init__(self, model, cfg, activation_shape, dtype):
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        if cfg.training.grad_norm_groups:
            raise ValueError("training.grad_norm_groups runs on the portable (CPU) engine only: Megatron's distributed "
                             "optimizer leaves each rank only its shard of the reduced gradients; set it false on GPU.")
        self.cfg = cfg
        config = model.config
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                                   use_distributed_optimizer=True)
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        config.no_sync_func = self.model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
                            adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad,
                            bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                            use_distributed_optimizer=True),
            [self.model])
        config.grad_scale_func = self.optimizer.scale_loss  # the fp16 loss scale (1 for bf16/fp32)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.scheduler.step(0)

    def forward_backward(self, micro_batches, forward_only=False):
        if not forward_only:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        seq_length, micro_batch_size = _schedule_lengths(self.cfg)
        return get_forward_backward_func()(
            forward_step_func=step.forward_step, data_iterator=iter(micro_batches), model=[self.model],
            num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=forward_only)

    def train_step(self, micro_batches):
        logs = self.forward_backward(micro_batches)
        lr = self.lr
        loss = step.global_mean_loss(logs, device=torch.cuda.current_device())
        if not math.isfinite(loss):  # Megatron's optimizer only skips fp16 overflows itself
            return StepResult(loss=loss, grad_norm=math.nan, lr=lr, applied=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0), lr=lr)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def reload_model_params(self):
        """After weights were loaded without optimizer state: the optimizer's fp32 main copies were made
        from the initial weights at construction, and its first step would copy them back."""
        self.optimizer.reload_model_params()

    def optimizer_sharded_state_dict(self, model_sharded_state_dict, is_loading=False):
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                                 metadata=DISTRIBUTED_OPTIMIZER_METADATA)

    def load_optimizer_state_dict(self, state):
        self.optimizer.load_state_dict(state)


def build_engine(model, cfg, activation_shape, dtype):
    engine = MegatronEngine if torch.cuda.is_available() else PortableEngine
    return engine(model, cfg, activation_shape, dtype)
