"""Preemption signals. USR1 (Slurm's warning before the time limit, which slurm/train.sbatch forwards to
the training) and SIGTERM (preemption, scancel) ask the training to stop; they do not kill it.

The handler only records the request. The trainer polls it once per step and agrees on it across ranks, so
every rank stops after the same step and writes one checkpoint; the command then exits with
PREEMPTED_EXIT_STATUS, which the batch script answers with `scontrol requeue`.
"""

import signal

PREEMPTED_EXIT_STATUS = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run again to continue
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """A callable for train(stop_requested=...): true once a stop signal has arrived."""

    def __init__(self):
        self.signal_name = None

    def install(self):
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def __call__(self):
        return self.signal_name is not None
