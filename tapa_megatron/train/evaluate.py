"""Validation loss during training: the model's mean loss over the same held-out batches each time
(training.eval_iters global batches of the validation split), forward only, on every layout.

    loss = validation_loss(engine, model, valid_ds, cfg, env, activation_shape, dtype)

Every evaluation uses samples [0, eval_iters * global_batch_size) of the validation split, cut across
data-parallel ranks exactly as a training step is, so the numbers of two evaluations (and of two
layouts) compare the same tokens.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tapa_megatron.train import pipeline
from tapa_megatron.train.batches import micro_batches
from tapa_megatron.train.engine import MegatronEngine, _global_mean_loss


def _portable_forward(model, batches, activation_shape, dtype):
    """The CPU pipeline's forwards alone (pipeline.py without the backwards): the mean loss of this
    rank's micro-batches on the last stage, None elsewhere."""
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    losses = []
    for batch in batches:
        input_tensor = None
        if not first:
            input_tensor = torch.empty(activation_shape, dtype=dtype)
            dist.recv(input_tensor, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(input_tensor)
        output = model(batch["tokens"], None, None, labels=batch["labels"] if last else None)
        if last:
            losses.append(pipeline.token_loss(output, batch["loss_mask"]))
        else:
            dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    return torch.stack(losses).mean() if last else None


def _megatron_forward(engine, batches):
    """GPU: Megatron-Core's schedule with forward_only=True, the training step's forward function."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = get_forward_backward_func()(
        forward_step_func=engine._forward_step, data_iterator=iter(batches), model=[engine.model],
        num_microbatches=len(batches), seq_length=engine.seq_length, micro_batch_size=engine.micro_batch_size,
        forward_only=True)
    return torch.stack([x["lm loss"] for x in outputs]).mean() if outputs else None


def validation_loss(engine, model, valid_ds, cfg, env, activation_shape, dtype):
    """Mean token loss over training.eval_iters held-out global batches (the same on every rank)."""
    t = cfg.training
    model.eval()
    stage_losses = []
    with torch.no_grad():
        for batch_index in range(t.eval_iters):
            batches = micro_batches(valid_ds, batch_index, t, env.data_parallel_size, env.data_parallel_rank,
                                    env.device, context_parallel=cfg.parallel.context)
            if isinstance(engine, MegatronEngine):
                stage_losses.append(_megatron_forward(engine, batches))
            else:
                stage_losses.append(_portable_forward(model, batches, activation_shape, dtype))
    model.train()
    last_stage = stage_losses[0] is not None
    return _global_mean_loss(torch.stack(stage_losses).mean() if last_stage else None)
