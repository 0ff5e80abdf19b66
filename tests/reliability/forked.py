"""Training runs in children forked from a server that has imported torch, megatron-core and the trainer
once (multiprocessing's forkserver): a run here starts in a fraction of a second instead of the several
seconds an import costs, which is what makes a sweep of kill -9 points affordable in CI. A child may die
of SIGKILL at any point; run() reports its exit code and, if it finished, what it returned.
"""

import multiprocessing
import os
import socket
import traceback

PRELOAD = ["tests.reliability.child"]  # imports torch, megatron.core and tapa_megatron.train
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(connection, environment, fn, args):
    os.environ.update(environment)
    import torch

    torch.set_num_threads(1)  # the same float sums in every run, and one core per rank
    try:
        outcome = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - whatever it was goes back to the test
        outcome = ("error", traceback.format_exc())
    connection.send(outcome)
    connection.close()


class Outcome:
    def __init__(self, exitcode, sent):
        self.exitcode = exitcode
        self.status, self.value = sent if sent is not None else ("killed", None)

    @property
    def killed(self):
        return self.exitcode == -9

    def result(self):
        assert self.status == "ok", f"child exited {self.exitcode}: {self.value}"
        return self.value


def run_ranks(world_size, fn, *args, timeout=600):
    """fn(*args) in world_size children joined as one torch.distributed world (their RANK, WORLD_SIZE,
    MASTER_ADDR/PORT set as torchrun sets them); a list of Outcome, in rank order."""
    context = _forkserver()
    port = str(_free_port())
    children = []
    for rank in range(world_size):
        environment = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} if world_size > 1 else {}
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(sender, environment, fn, args), daemon=True)
        process.start()
        sender.close()
        children.append((process, receiver))
    outcomes = []
    for process, receiver in children:
        sent = None
        if receiver.poll(timeout):
            try:
                sent = receiver.recv()
            except EOFError:  # killed before it could answer
                pass
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise AssertionError(f"a child ran longer than {timeout} s")
        outcomes.append(Outcome(process.exitcode, sent))
    return outcomes


def run(fn, *args, timeout=600):
    """fn(*args) in one child (a world of one); its Outcome."""
    return run_ranks(1, fn, *args, timeout=timeout)[0]
