"""Gradient norms by parameter group: where a grad-norm climb comes from (`tapa study`, hypothesis 4).

Groups: the rows of every layer's linear_qkv weight that make the q and k phase parts ("qk phase"), the
rows that make their amplitude parts ("qk amplitude"; under RoPE / NoPE, which have no phase part, all
q and k rows are "qk"), the v rows ("v"), and the other parameters by kind ("attention out", "mlp",
"embedding", "output layer", "norms"). The groups' squared norms sum to the total grad norm's square.
Only read: the gradients and so the training numerics are untouched.

The q/k/v rows follow Megatron's linear_qkv layout (model/qkv.py).
"""

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.attention import SelfAttention

from tapa_megatron.model.qkv import QK, QK_AMPLITUDE, QK_PHASE, V, qkv_row_groups

KINDS = (("norm", "norms"), ("linear_proj", "attention out"), ("mlp", "mlp"), ("embedding", "embedding"),
         ("output_layer", "output layer"))  # the first name part that matches decides (TE's fused norms are norms)
GROUPS = (QK_PHASE, QK_AMPLITUDE, QK, V, *(group for _, group in KINDS))  # one order on every rank


class GradGroups:
    """Built once for a model stage; norms() after the backward (before clipping) gives {group: norm}."""

    def __init__(self, model):
        rows = {}
        for module in model.modules():
            if isinstance(module, SelfAttention):
                labels = qkv_row_groups(module)
                for param in module.linear_qkv.parameters():
                    if param.shape[0] == len(labels):  # weight and bias; not TE's fused layer-norm weight
                        rows[param] = labels
        self.parts = []  # (param, [(group index, its rows' mask, or None: the whole parameter)])
        for name, param in model.named_parameters():
            if not (param.requires_grad and param_is_not_tensor_parallel_duplicate(param)):
                continue
            if param in rows:
                labels = rows[param]
                self.parts.append((param, [(GROUPS.index(group), torch.tensor([label == group for label in labels]))
                                           for group in set(labels)]))
                continue
            kind = next((group for part, group in KINDS if part in name), None)
            if kind is None:
                raise ValueError(f"training.grad_norm_groups has no group for parameter {name}; "
                                 "add its kind to grad_groups.KINDS.")
            self.parts.append((param, [(GROUPS.index(kind), None)]))

    def norms(self):
        """{group: L2 norm of its gradient} over the whole model (all stages, each TP shard once), for the
        groups this model has (qk phase / amplitude for TAPA, qk for the baselines)."""
        totals = torch.zeros(2, len(GROUPS), dtype=torch.float64)
        squares, present = totals  # present: some stage has a parameter of the group
        for param, groups in self.parts:
            for index, _ in groups:
                present[index] = 1.0
            if param.grad is None:
                continue
            row_squares = param.grad.detach().double().square().reshape(param.shape[0], -1)
            for index, mask in groups:
                squares[index] += row_squares.sum() if mask is None else row_squares[mask].sum()
        dist.all_reduce(totals, group=parallel_state.get_model_parallel_group())
        return {name: math.sqrt(value) for name, value, has in zip(GROUPS, *totals.tolist()) if has}
