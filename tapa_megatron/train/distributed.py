"""Process group and Megatron parallel state for a run: torchrun's environment, or one local process.

gloo on CPU, NCCL on GPU. The world is split into tensor x pipeline x context x data parallel groups
by Megatron's parallel_state; a world size that does not factor is refused before anything starts.
"""

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass
class ParallelEnv:
    rank: int
    world_size: int
    data_parallel_size: int
    data_parallel_rank: int
    device: torch.device

    @property
    def is_logging_rank(self):
        """The last rank: it sits on the last pipeline stage, where the loss is."""
        return self.rank == self.world_size - 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group():
    """Join (or create) the default process group from torchrun-style variables; alone if none are set."""
    if dist.is_initialized():
        return
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size)


def check_layout(run_config, world_size):
    """Refuse, before anything starts, a layout this machine cannot run. Returns the data-parallel size."""
    data_parallel = run_config.data_parallel_size(world_size)  # raises when the layout does not factor
    p = run_config.parallel
    if p.sequence_parallel and not torch.cuda.is_available():
        raise ValueError("parallel.sequence_parallel needs Transformer Engine on GPU; Megatron's CPU norms "
                         "refuse it. Set parallel.sequence_parallel=false on CPU.")
    if run_config.training.recompute and not torch.cuda.is_available():
        raise ValueError("training.recompute needs CUDA: megatron-core's activation checkpointing saves and restores "
                         "CUDA RNG state. On CPU leave it null (TAPA's torch path already recomputes attention "
                         "blocks in its backward).")
    if p.context > 1:
        raise NotImplementedError("parallel.context > 1: TAPA context parallelism is not built yet.")
    return data_parallel


def setup_parallel(run_config):
    """Initialise the process group and Megatron's parallel state for run_config.parallel."""
    init_process_group()
    world_size = dist.get_world_size()
    data_parallel = check_layout(run_config, world_size)
    p = run_config.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline, context_parallel_size=p.context
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelEnv(rank=dist.get_rank(), world_size=world_size, data_parallel_size=data_parallel,
                       data_parallel_rank=parallel_state.get_data_parallel_rank(), device=device)


def teardown_parallel():
    parallel_state.destroy_model_parallel()
