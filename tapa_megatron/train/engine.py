"""One optimizer step over a model stage: forward/backward over micro-batches, gradient reduction,
clipping, the update. Two engines with one interface:

- MegatronEngine (GPU): Megatron-Core's DDP, distributed optimizer and pipeline schedules.
- PortableEngine (CPU): the same model and parallel state, with what runs without CUDA: the GPipe
  schedule in pipeline.py, gradients all-reduced over the data-parallel group, torch AdamW, and a
  tensor-parallel-aware gradient norm. Megatron's DDP, optimizers, clip_grads, schedules and
  checkpoint writer allocate on CUDA unconditionally (megatron-core 0.16), hence this path.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from tapa_megatron.train import pipeline


@dataclass
class StepResult:
    loss: float  # mean over the global batch's tokens (same on every rank)
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    applied: bool = True  # False: the loss or gradient norm was NaN/Inf and the update was not applied (guard.py)


def lr_scheduler(optimizer, cfg):
    """Megatron's scheduler: linear warm-up, then cosine/linear decay to min_lr_ratio * lr at the last step."""
    o = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.lr * o.min_lr_ratio, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.training.steps, o.warmup_steps + 1), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(cfg.training.steps, 1),
        wd_incr_style="constant")


def _global_mean_loss(loss):
    """The last stage's loss, averaged over data-parallel ranks, made known to every rank."""
    totals = torch.zeros(2, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    if loss is not None:
        totals += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


class PortableEngine:
    def __init__(self, model, cfg, activation_shape, dtype):
        self.model, self.cfg = model, cfg
        self.activation_shape, self.dtype = activation_shape, dtype
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.scheduler.step(0)

    def _all_reduce_gradients(self):
        """Average over data-parallel and context-parallel ranks: each computed the mean loss of its own
        samples / sequence shard, all of equal token counts."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        if size == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= size
        for grad, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(chunk.view_as(grad))

    def _grad_norm(self):
        """L2 norm of the whole model's gradient: each tensor-parallel shard counted once, every stage."""
        squares = torch.zeros((), dtype=torch.float64)
        for param in self.model.parameters():
            if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                squares += param.grad.double().square().sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return math.sqrt(squares.item())

    def train_step(self, micro_batches):
        self.optimizer.zero_grad(set_to_none=True)
        loss = pipeline.forward_backward(self.model, micro_batches, self.activation_shape, self.dtype)
        self._all_reduce_gradients()
        grad_norm = self._grad_norm()
        loss, lr = _global_mean_loss(loss), self.lr
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same on every rank: both are global
            return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, applied=False)
        clip = self.cfg.optimizer.clip_grad
        if clip > 0 and grad_norm > clip:
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(clip / (grad_norm + 1e-6))
        self.optimizer.step()
        self.scheduler.step(1)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def optimizer_sharded_state_dict(self, model_sharded_state_dict, is_loading=False):
        """Adam moments as sharded tensors laid out like their parameters (reshardable), as Megatron's
        FP32Optimizer does it."""
        if is_loading and not self.optimizer.state:  # materialise the moments so there is a layout to load into
            for param in self.model.parameters():
                self.optimizer.state[param] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(param),
                                               "exp_avg_sq": torch.zeros_like(param)}
        state = self.optimizer.state_dict()
        id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.model.parameters())
        steps = {float(s["step"]) for s in state["state"].values()}
        optim_state_to_sharding_state(state, id_to_sharded, exclude_keys="step")
        for param_state in state["state"].values():
            param_state.pop("step", None)
        state["state"]["common_step"] = steps.pop() if steps else 0.0
        return state

    def load_optimizer_state_dict(self, state):
        step = state["state"].pop("common_step")
        for param_state in state["state"].values():
            param_state["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state)


class MegatronEngine:
    """GPU: Megatron-Core DDP (overlapped gradient reduce), distributed optimizer, pipeline schedules.

    Not exercised by the CPU test suite (no GPU there); see the note in docs/ and the issue tracker."""

    def __init__(self, model, cfg, activation_shape, dtype):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

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
                            bf16=config.bf16, params_dtype=config.params_dtype, use_distributed_optimizer=True),
            [self.model])
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.scheduler.step(0)
        self.seq_length, self.micro_batch_size = activation_shape[0], activation_shape[1]

    @staticmethod
    def _forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], None, None, labels=batch["labels"])

        def loss_func(per_token_loss):
            loss = pipeline.token_loss(per_token_loss, batch["loss_mask"])
            return loss, {"lm loss": loss.detach()}

        return output, loss_func

    def train_step(self, micro_batches):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(micro_batches), model=[self.model],
            num_microbatches=len(micro_batches), seq_length=self.seq_length, micro_batch_size=self.micro_batch_size,
            forward_only=False)
        lr = self.lr
        last_stage_loss = torch.stack([x["lm loss"] for x in losses]).mean() if losses else None
        loss = _global_mean_loss(last_stage_loss)
        if not math.isfinite(loss):  # Megatron's optimizer only skips fp16 overflows itself
            return StepResult(loss=loss, grad_norm=math.nan, lr=lr, applied=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0), lr=lr)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def optimizer_sharded_state_dict(self, model_sharded_state_dict, is_loading=False):
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading)

    def load_optimizer_state_dict(self, state):
        self.optimizer.load_state_dict(state)


def build_engine(model, cfg, activation_shape, dtype):
    engine = MegatronEngine if torch.cuda.is_available() else PortableEngine
    return engine(model, cfg, activation_shape, dtype)
