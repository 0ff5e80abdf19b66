"""The Slurm commands tapa submit and tapa status run (sinfo, squeue, sacct, sbatch), with errors that say what
went wrong."""

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
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SlurmError(f"{args[0]} refused: {'; '.join(line.strip() for line in said)}")  # one line: it goes into messages
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


def job_states(job_ids):
    """{job id: (state, elapsed, reason)} for those of job_ids that Slurm still knows: squeue for jobs in the
    queue or recently ended, sacct (when accounting is on) for older ones. Unknown ids are left out."""
    if not job_ids:
        return {}
    found = {}
    try:
        for line in _run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}",
                          "--format=%i|%T|%M|%r"]).splitlines():
            job_id, state, elapsed, reason = line.strip().split("|")
            found[job_id] = (state, elapsed, "" if reason == "None" else reason)
    except SlurmError as err:
        if "Invalid job id" not in str(err):  # squeue refuses a list of only ids it no longer knows
            raise
    rest = [job_id for job_id in job_ids if job_id not in found]
    if rest:
        try:
            accounted = _run(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(rest)}",
                              "--format=JobID,State,Elapsed,ExitCode"])
        except SlurmError:  # accounting is off (or sacct is missing): those jobs are simply not known
            accounted = ""
        for line in accounted.splitlines():
            job_id, state, elapsed, exit_code = line.strip().split("|")
            if job_id in rest:
                found[job_id] = (state.split()[0], elapsed, f"exit code {exit_code}" if exit_code != "0:0" else "")
    return found


def test_only(script):
    """sbatch --test-only: Slurm checks the script's options (partition, QOS, constraint, ...) and says when
    the job would start; nothing is submitted."""
    return _run(["sbatch", "--test-only", "--parsable"], stdin=script)


def sbatch(script, options=()):
    """Submit script (its text) with extra sbatch options; returns the job id."""
    return _run(["sbatch", "--parsable", *options], stdin=script).strip().split(";")[0]
