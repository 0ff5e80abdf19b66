"""A pipeline schedule for CPU runs: all forwards, then all backwards (GPipe), over gloo send/recv.

Megatron-Core's schedules (get_forward_backward_func) allocate on CUDA unconditionally, so CPU runs
use this one; GPU runs use Megatron's (see engine.py). Stages exchange [seq, micro_batch, hidden]
activations through the model's `set_input_tensor`, Megatron's hook for pipeline inputs.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def token_loss(per_token_loss, loss_mask):
    """Mean loss over the micro-batch's unmasked tokens."""
    loss_mask = loss_mask.float()
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp_min(1)


def forward_backward(model, micro_batches, activation_shape, dtype):
    """Run every micro-batch through this stage and back. Returns the mean loss on the last stage
    (None elsewhere); gradients are left in the parameters, scaled for an average over micro-batches."""
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    prev_rank = None if first else parallel_state.get_pipeline_model_parallel_prev_rank()
    next_rank = None if last else parallel_state.get_pipeline_model_parallel_next_rank()
    count = len(micro_batches)
    inputs, outputs, losses = [], [], []
    for batch in micro_batches:
        input_tensor = None
        if not first:
            input_tensor = torch.empty(activation_shape, dtype=dtype)
            dist.recv(input_tensor, src=prev_rank)
            input_tensor.requires_grad_()
        model.set_input_tensor(input_tensor)
        output = model(batch["tokens"], None, None, labels=batch["labels"] if last else None)
        if last:
            loss = token_loss(output, batch["loss_mask"])
            losses.append(loss.detach())
            output = loss / count
        else:
            dist.send(output.detach().contiguous(), dst=next_rank)
        inputs.append(input_tensor)
        outputs.append(output)
    for input_tensor, output in zip(reversed(inputs), reversed(outputs)):
        if last:
            output.backward()
        else:
            grad = torch.empty_like(output)
            dist.recv(grad, src=next_rank)
            output.backward(grad)
        if not first:
            dist.send(input_tensor.grad.contiguous(), dst=prev_rank)
    return torch.stack(losses).mean() if last else None
