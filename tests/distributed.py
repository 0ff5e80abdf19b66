"""Run a function on N real processes joined by a gloo process group (CPU)."""

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:
        results[rank] = ("error", traceback.format_exc())
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(world_size, fn, *args):
    """Call fn(rank, world_size, *args) on world_size processes; return the list of their results.

    fn must be a module-level function (it is pickled for the spawned processes)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world_size, _free_port(), fn, args, results), nprocs=world_size, join=True)
        results = dict(results)
    errors = [f"rank {r}:\n{out}" for r, (status, out) in sorted(results.items()) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r][1] for r in range(world_size)]
