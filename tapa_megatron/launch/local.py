"""`tapa train --nproc N`: N local ranks (gloo on CPU), children of this launcher that never outlive it.

Each rank asks the kernel to SIGKILL it when the launcher dies (Linux's PR_SET_PDEATHSIG), so a launcher
killed with SIGKILL does not leave its ranks training and writing checkpoints. SIGTERM, USR1 and SIGINT
sent to the launcher reach every rank as a stop request: they stop after the same step, checkpoint and
exit with PREEMPTED_EXIT_STATUS. SIGINT is passed on as SIGTERM and the ranks ignore SIGINT themselves,
because a Ctrl-C in a terminal reaches the whole process group; a second Ctrl-C kills the ranks at once.
The launcher's exit status is the ranks': 0, PREEMPTED_EXIT_STATUS, or 1 after rank 0 printed a one-line
error (train.errors.RunError).
"""

import ctypes
import os
import signal
import sys

import torch.multiprocessing as mp

from tapa_megatron.launch.signals import PREEMPTED_EXIT_STATUS, StopRequest

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _die_with_launcher(launcher_pid):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: a rank may outlive a launcher killed with SIGKILL
        return
    if os.getppid() != launcher_pid:  # the launcher died before the request took effect
        os._exit(1)


def _rank(rank, world_size, port, cfg, launcher_pid):
    _die_with_launcher(launcher_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher passes Ctrl-C on as SIGTERM
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from tapa_megatron.train import train
    from tapa_megatron.train.errors import RunError

    with StopRequest(signals=(signal.SIGUSR1, signal.SIGTERM)) as stop:
        try:
            result = train(cfg, stop_requested=stop)
        except RunError as err:
            if rank == 0:
                print(f"tapa: {err}", file=sys.stderr, flush=True)
            sys.exit(1)
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_STATUS)


def run(cfg, nproc):
    """Train cfg on nproc local ranks; returns the exit status for the command."""
    from tapa_megatron.train.distributed import _free_port

    ranks = mp.start_processes(_rank, args=(nproc, _free_port(), cfg, os.getpid()), nprocs=nproc, join=False,
                               start_method="spawn")
    interrupts = 0

    def pass_on(signum, _frame):
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            signum = signal.SIGTERM if interrupts == 1 else signal.SIGKILL
        for pid in ranks.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        while not ranks.join():
            pass
        return 0
    except mp.ProcessExitedException as err:
        if interrupts > 1:
            print("tapa: interrupted twice: the ranks were killed without a checkpoint (the complete ones are kept)",
                  file=sys.stderr)
            return INTERRUPTED_EXIT_STATUS
        if err.exit_code < 0:
            print(f"tapa: rank {err.error_index} was killed by {err.signal_name}; the others were stopped. Run the "
                  "same command again to resume from the newest complete checkpoint.", file=sys.stderr)
            return 1
        return err.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
