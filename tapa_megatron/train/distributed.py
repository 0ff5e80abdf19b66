"""Process group and Megatron parallel state for a run, however it was launched: torchrun, srun, an MPI
launcher (mpirun/mpiexec, through mpi4py), or one local process (detect_launch).

gloo on CPU, NCCL on GPU. The world is split into tensor x pipeline x context x data parallel groups
by Megatron's parallel_state; a world size that does not factor is refused before anything starts.
"""

import functools
import ipaddress
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


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


# What MPI launchers tell their ranks: MPICH, Intel MPI (PMI_SIZE), Open MPI, MVAPICH.
MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class Launch:
    """How this process was started: its place in the world and where rank 0 listens for the others."""
    launcher: str  # torchrun (or anything that sets RANK/WORLD_SIZE), srun, mpi or single
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int  # 0: pick a free one (a single process)

    def __str__(self):
        return (f"{self.launcher}: rank {self.rank} of {self.world_size} (local rank {self.local_rank}) on "
                f"{socket.gethostname()}, rendezvous {self.master_addr}:{self.master_port or 'any free port'}")


def slurm_port(job_id):
    """The rendezvous port of a Slurm job; slurm/train.sbatch derives MASTER_PORT the same way."""
    return 10000 + int(job_id) % 50000


def first_host(nodelist):
    """The first host of a Slurm node list: 'gpu[007-009,012],cpu1' -> 'gpu007'."""
    prefix, first_index = re.match(r"([^,\[]*)(?:\[([^\],-]+))?", nodelist).groups()
    return prefix + (first_index or "")


def detect_launch(env=os.environ):
    """Recognise the launcher from the environment it gives each rank.

    torchrun's RANK/WORLD_SIZE come first (torchrun started by srun is still torchrun). An srun step
    (SLURM_STEP_NUM_TASKS) comes next, unless an MPI launcher inside the allocation started a world of
    another size. MPI ranks learn their place from mpi4py, and rank 0's address from a broadcast.
    MASTER_ADDR / MASTER_PORT, when set, override the address and port found here.
    """
    mpi_size = next((int(env[name]) for name in MPI_SIZE_VARIABLES if name in env), None)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        if world_size > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
            raise ValueError("RANK and WORLD_SIZE are set but MASTER_ADDR / MASTER_PORT are not: launch with "
                             "torchrun, or set both to rank 0's address and a free port.")
        return Launch("torchrun", rank, world_size, int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0)))
    step_tasks = env.get("SLURM_STEP_NUM_TASKS")
    if step_tasks is not None and mpi_size in (None, int(step_tasks)):
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        return Launch("srun", int(env["SLURM_PROCID"]), int(step_tasks), int(env["SLURM_LOCALID"]),
                      env.get("MASTER_ADDR") or first_host(nodelist),
                      int(env.get("MASTER_PORT") or slurm_port(env["SLURM_JOB_ID"])))
    if mpi_size is not None:
        return _mpi_launch(env.get("MASTER_ADDR"), int(env.get("MASTER_PORT", 0)))
    return Launch("single", 0, 1, 0, "127.0.0.1", 0)


@functools.cache  # MPI is initialised once; every later call returns the same answer
def _mpi_launch(master_addr, master_port):
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(f"this process was started by an MPI launcher, but mpi4py cannot be imported ({err}): "
                           "pip install mpi4py (built for this MPI), or launch with torchrun or srun.") from None
    world = MPI.COMM_WORLD
    local_rank = world.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    rendezvous = None
    if world.rank == 0:
        try:
            rendezvous = (master_addr or socket.gethostbyname(socket.gethostname()), master_port or _free_port())
        except OSError as err:
            rendezvous = err
    rendezvous = world.bcast(rendezvous, root=0)
    if isinstance(rendezvous, OSError):
        raise RuntimeError(f"rank 0 cannot resolve its own host name {socket.gethostname()!r} ({rendezvous}): "
                           "set MASTER_ADDR to its address.")
    nodes = world.allreduce(int(local_rank == 0))
    if not master_addr and nodes > 1 and ipaddress.ip_address(rendezvous[0]).is_loopback:
        raise RuntimeError(f"rank 0's host name resolves to {rendezvous[0]}, which the other {nodes - 1} node(s) "
                           "cannot reach: set MASTER_ADDR to its address on the cluster network.")
    return Launch("mpi", world.rank, world.size, local_rank, *rendezvous)


def init_process_group():
    """Join (or create) the default process group of however this process was launched (detect_launch)."""
    if dist.is_initialized():
        return
    launch = detect_launch()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
    host = f"[{launch.master_addr}]" if ":" in launch.master_addr else launch.master_addr  # IPv6
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            init_method=f"tcp://{host}:{launch.master_port or _free_port()}",
                            rank=launch.rank, world_size=launch.world_size)


def check_layout(run_config, world_size):
    """Refuse, before anything starts, a layout this machine cannot run. Returns the data-parallel size."""
    data_parallel = run_config.data_parallel_size(world_size)  # raises when the layout does not factor
    p = run_config.parallel
    if p.sequence_parallel and not torch.cuda.is_available():
        raise ValueError("parallel.sequence_parallel needs Transformer Engine on GPU; Megatron's CPU norms "
                         "refuse it. Set parallel.sequence_parallel=false on CPU.")
    if run_config.model.tie_embeddings and p.pipeline > 1 and not torch.cuda.is_available():
        raise ValueError("model.tie_embeddings with parallel.pipeline > 1 needs CUDA: megatron-core moves the shared "
                         "embedding to the GPU to synchronise it between the first and last stage. Set "
                         "model.tie_embeddings=false or parallel.pipeline=1 on CPU.")
    if run_config.training.recompute and not torch.cuda.is_available():
        raise ValueError("training.recompute needs CUDA: megatron-core's activation checkpointing saves and restores "
                         "CUDA RNG state. On CPU leave it null (TAPA's torch path already recomputes attention "
                         "blocks in its backward).")
    if p.context > 1:
        if run_config.data.seq_length % (2 * p.context):
            raise ValueError(f"data.seq_length={run_config.data.seq_length} is not a multiple of 2 x parallel.context = "
                             f"{2 * p.context} (the load-balanced layout cuts each sequence into {2 * p.context} chunks).")
        if p.context_comm not in ("p2p", "all_gather", "a2a"):
            raise ValueError(f"parallel.context_comm={p.context_comm!r} is unknown; use p2p, all_gather or a2a.")
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
    if torch.cuda.is_available():  # the RNG tracker tensor-parallel regions and activation recompute fork from
        tensor_parallel.model_parallel_cuda_manual_seed(run_config.training.seed)
    return ParallelEnv(rank=dist.get_rank(), world_size=world_size, data_parallel_size=data_parallel,
                       data_parallel_rank=parallel_state.get_data_parallel_rank(), device=device)


def teardown_parallel():
    parallel_state.destroy_model_parallel()
