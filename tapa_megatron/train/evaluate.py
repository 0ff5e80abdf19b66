"""Validation loss during training: the model's mean loss over the same held-out batches each time
(training.eval_iters global batches of the validation split), forward only, on every layout.

    loss = validation_loss(engine, model, valid_ds, cfg, env, activation_shape, dtype)

Every evaluation uses samples [0, eval_iters * global_batch_size) of the validation split, cut across
data-parallel ranks exactly as a training step is, so the numbers of two evaluations (and of two
layouts) compare the same tokens.
"""

from contextlib import nullcontext

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from tapa_megatron.train import step
from tapa_megatron.train.batches import micro_batches
from tapa_megatron.train.engine import CudaCountersOnCpu, MegatronEngine


def _gpipe_forward(model, batches, activation_shape, dtype):
    """CPU with pipeline stages: pipeline.py's forwards alone, over gloo send/recv. The last stage's
    per-micro-batch logs, as Megatron's schedule returns them (nothing elsewhere)."""
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    logs = []
    for batch in batches:
        input_tensor = None
        if not first:
            input_tensor = torch.empty(activation_shape, dtype=dtype)
            dist.recv(input_tensor, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(input_tensor)
        output = model(batch["tokens"], None, None, labels=batch["labels"] if last else None)
        if last:
            logs.append(step.loss_func(batch["loss_mask"], output)[2])
        else:
            dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    return logs


def _schedule_forward(engine, batches):
    """Megatron-Core's schedule with forward_only=True and the training step's forward function."""
    on_gpu = isinstance(engine, MegatronEngine)
    with nullcontext() if on_gpu else CudaCountersOnCpu():
        return get_forward_backward_func()(
            forward_step_func=step.forward_step, data_iterator=iter(batches), model=[engine.model],
            num_microbatches=len(batches), seq_length=engine.cfg.data.seq_length,
            micro_batch_size=engine.cfg.training.micro_batch_size, forward_only=True)


def validation_loss(engine, model, valid_ds, cfg, env, activation_shape, dtype):
    """Mean token loss over training.eval_iters held-out global batches (the same on every rank)."""
    t = cfg.training
    gpipe = not isinstance(engine, MegatronEngine) and parallel_state.get_pipeline_model_parallel_world_size() > 1
    model.eval()
    logs = []
    with torch.no_grad():
        for batch_index in range(t.eval_iters):
            batches = micro_batches(valid_ds, batch_index, t, env.data_parallel_size, env.data_parallel_rank,
                                    env.device, context_parallel=cfg.parallel.context)
            if gpipe:
                logs += _gpipe_forward(model, batches, activation_shape, dtype)
            else:
                logs += _schedule_forward(engine, batches)
    model.train()
    return step.global_mean_loss(logs, device=env.device)
