"""The forward step and loss function both engines hand to Megatron-Core's schedules.

The loss function keeps Megatron's 3-tuple contract (pretrain_gpt.py): (loss_sum, num_tokens, logs).
The schedule divides loss_sum by num_tokens and by the number of micro-batches; DDP (or the portable
engine's stand-in) then averages over the data- and context-parallel ranks. A 2-tuple (a mean loss)
would instead be multiplied by the context-parallel size, which is right only for a loss already
divided by the whole sequence's token count: with a per-rank mean it makes gradients CP x too large.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def loss_func(loss_mask, per_token_loss):
    """(sum of the unmasked tokens' losses, their count, logs) for one micro-batch on this rank."""
    loss_mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    """Megatron's forward_step_func: the stage's output and the loss function for it."""
    batch = next(data_iterator)
    last = parallel_state.is_pipeline_last_stage()
    output = model(batch["tokens"], None, None, labels=batch["labels"] if last else None)
    return output, lambda per_token_loss: loss_func(batch["loss_mask"], per_token_loss)


def global_token_totals(logs, device):
    """(loss_sum, num_tokens) over every unmasked token of the global batch, float64 on `device`, the
    same on every rank.

    logs: the schedule's output, one {"lm loss": [loss_sum, num_tokens]} per micro-batch on the last
    pipeline stage, nothing elsewhere. device: where the collectives run (CUDA under NCCL); the logs
    are moved there from wherever the loss was computed. Summed over the data- and context-parallel
    group here, then over the pipeline group so that every stage learns it."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for log in logs:
        totals += log["lm loss"].to(totals)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return totals


def global_mean_loss(logs, device):
    """Mean loss over every unmasked token of the global batch, the same on every rank."""
    loss_sum, num_tokens = global_token_totals(logs, device).tolist()
    return loss_sum / max(num_tokens, 1)
