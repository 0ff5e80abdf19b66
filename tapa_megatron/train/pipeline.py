"""A pipeline schedule for CPU runs: all forwards, then all backwards (GPipe), over gloo send/recv.

Megatron-Core's pipelined schedules send over CUDA p2p, so CPU runs with pipeline > 1 use this one
(see the seam in engine.py). It keeps their contract: the forward step and 3-tuple loss of step.py,
the loss divided by its token count and the number of micro-batches, the per-micro-batch logs
returned, and the config's finalize_model_grads_func called at the end. Stages exchange
[seq, micro_batch, hidden] activations through the model's `set_input_tensor`.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tapa_megatron.train import step


def forward_backward(model, micro_batches, activation_shape, dtype, forward_only=False):
    """Run every micro-batch through this stage and back (only through, with forward_only). Returns the
    logs of the last stage's loss function (empty elsewhere); gradients are left in the parameters,
    finalised as Megatron's are."""
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    prev_rank = None if first else parallel_state.get_pipeline_model_parallel_prev_rank()
    next_rank = None if last else parallel_state.get_pipeline_model_parallel_next_rank()
    count = len(micro_batches)
    data = iter(micro_batches)
    inputs, outputs, logs = [], [], []
    for _ in range(count):
        input_tensor = None
        if not first:
            input_tensor = torch.empty(activation_shape, dtype=dtype)
            dist.recv(input_tensor, src=prev_rank)
            input_tensor.requires_grad_(not forward_only)
        model.module.set_input_tensor(input_tensor)
        output, loss_func = step.forward_step(data, model)
        if last:
            loss_sum, num_tokens, log = loss_func(output)
            logs.append(log)
            output = loss_sum / num_tokens.clamp_min(1) / count
        else:
            dist.send(output.detach().contiguous(), dst=next_rank)
        inputs.append(input_tensor)
        outputs.append(output)
    if forward_only:
        return logs
    for input_tensor, output in zip(reversed(inputs), reversed(outputs)):
        if last:
            output.backward()
        else:
            grad = torch.empty_like(output)
            dist.recv(grad, src=next_rank)
            output.backward(grad)
        if not first:
            dist.send(input_tensor.grad.contiguous(), dst=prev_rank)
    model.config.finalize_model_grads_func([model], None)
    return logs
