"""Global batches from a GPTDataset, addressed by the number of samples consumed so far.

Step s uses samples [s*G, (s+1)*G) of the dataset (G = global batch size); data-parallel rank r takes
the r-th contiguous slice of them, cut into micro-batches. A resumed run therefore sees exactly the
samples an uninterrupted run would, on any layout with the same global batch size. With context
parallelism every rank of a context-parallel group takes the same samples and keeps its zigzag share
of each sequence (Megatron's get_batch_on_this_cp_rank layout).
"""

import torch
from megatron.core import parallel_state

from tapa_megatron.parallel.layout import shard_sequence


def global_batch_samples(step, global_batch_size, data_parallel_size, data_parallel_rank):
    per_rank = global_batch_size // data_parallel_size
    start = step * global_batch_size + data_parallel_rank * per_rank
    return range(start, start + per_rank)


def micro_batches(dataset, step, training, data_parallel_size, data_parallel_rank, device, context_parallel=1):
    """This rank's micro-batches for step: a list of dicts of (micro_batch, seq / context_parallel) tensors."""
    indices = list(global_batch_samples(step, training.global_batch_size, data_parallel_size, data_parallel_rank))
    batches = []
    for start in range(0, len(indices), training.micro_batch_size):
        samples = [dataset[i] for i in indices[start : start + training.micro_batch_size]]
        batch = {key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]).to(device)
                 for key in ("tokens", "labels", "loss_mask")}
        if context_parallel > 1:
            rank = parallel_state.get_context_parallel_rank()
            batch = {key: shard_sequence(x, [x.shape[1]], context_parallel, rank) for key, x in batch.items()}
        batches.append(batch)
    return batches
