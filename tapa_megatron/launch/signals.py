"""Stop signals. USR1 (Slurm's warning before the time limit, which slurm/train.sbatch forwards to the
training), SIGTERM (preemption, scancel) and SIGINT (Ctrl-C) ask the training to stop; they do not kill it.

The handler only records the request. The trainer polls it once per step and agrees on it across ranks, so
every rank stops after the same step and writes one checkpoint; the command then exits with
PREEMPTED_EXIT_STATUS, which the batch script answers with `scontrol requeue`. A second SIGINT does not
wait: it interrupts at once (KeyboardInterrupt), keeping the checkpoints already complete.
"""

import signal

PREEMPTED_EXIT_STATUS = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run again to continue
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A callable for train(stop_requested=...): true once a stop signal has arrived. As a context manager it
    installs its handlers on entry and puts the previous ones back on exit."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.signal_name = None
        self._previous = {}

    def install(self):
        for sig in self.signals:
            self._previous.setdefault(sig, signal.signal(sig, self._record))
        return self

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, _frame):
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts without waiting for the checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __call__(self):
        return self.signal_name is not None
