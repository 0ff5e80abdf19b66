"""RunError: a problem with a run's inputs or stored state that its user fixes (a bad recipe value, a
missing data directory, a checkpoint that does not fit, a diverged loss, a full disk). The `tapa`
command prints it as one line, on rank 0 only, and exits non-zero; anything else is a bug and keeps
its traceback."""


class RunError(RuntimeError):
    pass
