"""Validation loss during training: the model's mean token loss over the same held-out batches each
time (training.eval_iters global batches of the validation split), forward only, on every layout.

Every evaluation uses samples [0, eval_iters * global_batch_size) of the validation split, cut across
data-parallel ranks exactly as a training step is, and runs them through the engine's own schedule
(the training step's forward step and loss function, forward_only), so two evaluations (and two
layouts) compare the same tokens with the same code.
"""

import torch

from tapa_megatron.train import step
from tapa_megatron.train.batches import micro_batches


def validation_loss(engine, model, valid_ds, cfg, env):
    """Mean token loss over training.eval_iters held-out global batches (the same on every rank)."""
    t = cfg.training
    logs = []
    model.eval()
    with torch.no_grad():
        for batch_index in range(t.eval_iters):
            batches = micro_batches(valid_ds, batch_index, t, env.data_parallel_size, env.data_parallel_rank,
                                    env.device, context_parallel=cfg.parallel.context)
            logs += engine.forward_backward(batches, forward_only=True)
    model.train()
    return step.global_mean_loss(logs, device=env.device)
