"""The Slurm commands tapa submit runs (sinfo, squeue, sbatch), with errors that say what went wrong."""

import shutil
import subprocess


class SlurmError(RuntimeError):
    pass


def available():
    return shutil.which("sbatch") is not None


def _run(args, stdin=None):
    if shutil.which(args[0]) is None:
        raise SlurmError(f"{args[0]} is not on PATH: run tapa submit where Slurm's commands are (a login node), "
                         "or pass --dry-run to only print the batch script.")
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SlurmError(f"{args[0]} refused: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def partitions():
    """The names of the cluster's partitions."""
    return sorted(set(_run(["sinfo", "--noheader", "--format=%R"]).split()))


def active_jobs(job_ids):
    """Those of job_ids that are still pending or running (finished jobs leave squeue)."""
    if not job_ids:
        return []
    queued = set(_run(["squeue", "--noheader", "--format=%i", "--me"]).split())
    return sorted(set(job_ids) & queued, key=int)


def sbatch(script, options=()):
    """Submit script (its text) with extra sbatch options; returns the job id."""
    return _run(["sbatch", "--parsable", *options], stdin=script).strip().split(";")[0]
