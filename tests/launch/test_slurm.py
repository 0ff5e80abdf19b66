"""tapa submit against a real Slurm (local_slurm.py: slurmctld and two slurmd on this machine).

A job runs to the end with its checkpoint and log where tapa submit said. USR1 to a two-node job makes it
checkpoint, requeue and resume to bitwise the weights of an uninterrupted run. A rank killed with SIGKILL
costs only the steps since the last complete checkpoint. A chain starts each stage from the previous
stage's final checkpoint. Bad input submits nothing and writes nothing.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tapa_megatron import cli
from tapa_megatron.launch import script

STEPS = 120
TRAINING = ["data.split=1,1,0", "data.seq_length=32", "training.global_batch_size=4", "training.micro_batch_size=2",
            "training.log_every=1", "training.tensorboard=false", "optimizer.warmup_steps=1"]
LONG_RUN = [*TRAINING, f"training.steps={STEPS}", "checkpoint.save_every=20"]
CPU_JOB = ["--gpus-per-node", "0", "--time", "00:10:00"]


def tapa_submit(cluster, *args, cwd):
    result = subprocess.run([sys.executable, "-m", "tapa_megatron.cli", "submit", *map(str, args)], env=cluster.env,
                            cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def job_ids(stdout):
    return re.findall(r"^submitted job (\d+)", stdout, flags=re.M)


def wait_until(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def step_losses(log):
    """Every logged (step, loss) of a job's log; a step run twice (after a hard kill) appears twice."""
    return [(int(step), loss) for step, loss in re.findall(r"step (\d+)/\d+ \| loss (\S+)", Path(log).read_text())]


def checkpoint_tensors(path, scratch):
    """All tensors of a torch_dist checkpoint (weights and Adam moments), read without building a model."""
    dcp_to_torch_save(path, scratch)
    return {key: value for key, value in torch.load(scratch, weights_only=False).items() if torch.is_tensor(value)}


def assert_same_run(log, final, reference, scratch):
    """Every step's loss and the final weights and optimizer state equal the uninterrupted run's, bitwise."""
    expected = dict(step_losses(reference["log"]))
    assert sorted(expected) == list(range(1, STEPS + 1))
    logged = step_losses(log)
    assert {step for step, _ in logged} == set(expected)
    assert all(loss == expected[step] for step, loss in logged)
    ours = checkpoint_tensors(final, scratch / "ours.pt")
    theirs = checkpoint_tensors(reference["final"], scratch / "reference.pt")
    assert ours.keys() == theirs.keys() and len(ours) > 20
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def task_pid(job_id, rank):
    """The process of one rank of a running job, found through its environment."""
    for proc in Path("/proc").iterdir():
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_text().split("\0")
        except (OSError, ValueError):
            continue
        if environ.get("SLURM_JOB_ID") == job_id and environ.get("SLURM_PROCID") == str(rank) and \
                "tapa_megatron.cli" in cmdline and Path(cmdline[0]).name.startswith("python"):
            return int(proc.name)
    return None


@pytest.fixture(scope="module")
def reference(slurm_cluster, novels_data, tmp_path_factory):
    """An uninterrupted job: one node, two tasks, the recipe's own run_dir (relative to where it is submitted)."""
    cwd = tmp_path_factory.mktemp("reference")
    stdout = tapa_submit(slurm_cluster, "tiny-cpu", *CPU_JOB, "--tasks-per-node", 2, f"data.path={novels_data}",
                         *LONG_RUN, cwd=cwd)
    (job,) = job_ids(stdout)
    run_dir = cwd / "runs" / "tiny-cpu"
    log = run_dir / "logs" / f"slurm-{job}.out"
    slurm_cluster.wait_for(job, "COMPLETED", log=log)
    return {"stdout": stdout, "job": job, "run_dir": run_dir, "log": log,
            "final": run_dir / "checkpoints" / f"step_{STEPS:08d}"}


def test_submitted_job_trains_to_the_end_where_it_said(reference):
    run_dir, log, job = reference["run_dir"], reference["log"], reference["job"]
    assert f"run dir  {run_dir} (a new run)" in reference["stdout"]
    assert f"log      {log}" in reference["stdout"]
    assert f"script   {run_dir / 'logs' / f'slurm-{job}.sbatch'}" in reference["stdout"]
    text = log.read_text()
    assert f"[slurm] job {job} restart 0 on n1, 2 tasks" in text
    assert "[launch] srun: rank 0 of 2" in text and "[slurm] training finished" in text
    assert (reference["final"] / "tapa_complete.json").is_file()
    assert (run_dir / "config.yaml").is_file()


def test_usr1_checkpoints_requeues_and_resumes_exactly_on_two_nodes(slurm_cluster, novels_data, reference,
                                                                    tmp_path):
    run_dir = tmp_path / "run"
    stdout = tapa_submit(slurm_cluster, "tiny-cpu", *CPU_JOB, "--nodes", 2, "--tasks-per-node", 1,
                         "--run-dir", run_dir, f"data.path={novels_data}", *LONG_RUN, cwd=tmp_path)
    (job,) = job_ids(stdout)
    log = run_dir / "logs" / f"slurm-{job}.out"
    wait_until(lambda: log.is_file() and "step 5/" in log.read_text(), "step 5 in the log")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@300 sends
    wait_until(lambda: slurm_cluster.job(job)["Restarts"] == "1" and slurm_cluster.idle(), "the requeue")
    # A requeued job waits ~2 minutes before it may start again. Start it now, but not within the second its
    # old instance was killed in: slurmd refuses a job credential made in the second it revoked the job's.
    time.sleep(2)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    slurm_cluster.wait_for(job, "COMPLETED", log=log)

    text = log.read_text()
    assert f"[slurm] job {job} restart 0 on n[1-2], 2 tasks" in text  # one rank on each node
    assert f"[slurm] job {job} restart 1 on n[1-2], 2 tasks" in text
    stopped = int(re.search(r"every rank stops after step (\d+)", text).group(1))
    assert 5 <= stopped < STEPS
    assert f"requeueing job {job}" in text
    assert f"[resume] continuing from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in text
    assert_same_run(log, run_dir / "checkpoints" / f"step_{STEPS:08d}", reference, tmp_path)


def test_a_hard_killed_rank_costs_only_the_steps_since_the_last_checkpoint(slurm_cluster, novels_data, reference,
                                                                           tmp_path):
    run_dir = tmp_path / "run"
    submit = ["tiny-cpu", *CPU_JOB, "--tasks-per-node", 2, "--run-dir", run_dir, f"data.path={novels_data}", *LONG_RUN]
    (job,) = job_ids(tapa_submit(slurm_cluster, *submit, cwd=tmp_path))
    log = run_dir / "logs" / f"slurm-{job}.out"
    wait_until(lambda: (run_dir / "checkpoints" / "step_00000040" / "tapa_complete.json").is_file(),
               "the checkpoint of step 40")
    pid = task_pid(job, rank=1)
    assert pid is not None and slurm_cluster.job(job)["JobState"] == "RUNNING"
    os.kill(pid, signal.SIGKILL)
    slurm_cluster.wait_for(job, "FAILED", log=log)
    assert "training failed" in log.read_text()
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert 40 <= int(latest.removeprefix("step_")) < STEPS

    stdout = tapa_submit(slurm_cluster, *submit, cwd=tmp_path)  # the same command again
    assert f"run dir  {run_dir} (resumes from {latest})" in stdout
    (second,) = job_ids(stdout)
    second_log = run_dir / "logs" / f"slurm-{second}.out"
    slurm_cluster.wait_for(second, "COMPLETED", log=second_log)
    assert f"[resume] continuing from {run_dir}/checkpoints/{latest}" in second_log.read_text()
    first_steps = [step for step, _ in step_losses(log)]
    second_steps = [step for step, _ in step_losses(second_log)]
    assert second_steps[0] == int(latest.removeprefix("step_")) + 1 <= first_steps[-1] + 1
    (run_dir / "combined.out").write_text(log.read_text() + second_log.read_text())
    assert_same_run(run_dir / "combined.out", run_dir / "checkpoints" / f"step_{STEPS:08d}", reference, tmp_path)


def test_a_chain_starts_each_stage_from_the_previous_stages_final_checkpoint(slurm_cluster, novels_data, tmp_path):
    stdout = tapa_submit(slurm_cluster, "--chain", "tiny-cpu", "tiny-cpu-extend", *CPU_JOB, "--tasks-per-node", 2,
                         "--run-dir", tmp_path / "runs", f"data.path={novels_data}", *TRAINING, "training.steps=2",
                         cwd=tmp_path)
    first, second = job_ids(stdout)
    assert f"submitted job {second}: tiny-cpu-extend, after job {first} succeeds" in stdout
    assert slurm_cluster.job(second)["Dependency"].startswith(f"afterok:{first}")
    for job, stage in ((first, "tiny-cpu"), (second, "tiny-cpu-extend")):
        slurm_cluster.wait_for(job, "COMPLETED", log=tmp_path / "runs" / stage / "logs" / f"slurm-{job}.out")
    extension_log = (tmp_path / "runs" / "tiny-cpu-extend" / "logs" / f"slurm-{second}.out").read_text()
    assert f"[extend] starting from {tmp_path}/runs/tiny-cpu/checkpoints/step_00000002" in extension_log
    assert (tmp_path / "runs" / "tiny-cpu-extend" / "checkpoints" / "step_00000002" / "tapa_complete.json").is_file()


def test_the_template_runs_by_hand_with_plain_sbatch(slurm_cluster, novels_data, tmp_path):
    """slurm/README.md's by-hand use: the allocation on sbatch's command line, the recipe as arguments."""
    (tmp_path / "logs").mkdir()
    result = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=00:30:00", script.TEMPLATE, cli.RECIPES_DIR / "tiny-cpu.yaml",
         f"data.path={novels_data}", *TRAINING, "training.steps=2", f"run_dir={tmp_path / 'run'}"],
        env={**slurm_cluster.env, "TAPA_PYTHON": sys.executable}, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    log = tmp_path / "logs" / f"tapa-{job}.out"  # the template's --output=logs/%x-%j.out
    slurm_cluster.wait_for(job, "COMPLETED", log=log)
    assert "[launch] srun: rank 0 of 2" in log.read_text()
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "tapa_complete.json").is_file()


BAD_INPUT = {
    "missing recipe": (["no-such-recipe"], {}, "no recipe 'no-such-recipe'"),
    "unknown partition": (["tiny-cpu"], {"--partition": "h100"}, "unknown partition 'h100'; this cluster has: debug"),
    "time below the signal lead": (["tiny-cpu"], {"--time": "00:04:00"}, "is shorter than the signal lead (300 s"),
    "time not understood": (["tiny-cpu"], {"--time": "90min"}, "--time '90min' is not [D-]HH:MM:SS"),
    "world does not factor": (["tiny-cpu", "parallel.tensor=2"], {"--tasks-per-node": "3"},
                              "world size 3 does not factor into tensor (2)"),
    "CPU job without tasks": (["tiny-cpu"], {"--tasks-per-node": None}, "--gpus-per-node 0 is a CPU job"),
    "sbatch option tapa sets": (["tiny-cpu"], {"--sbatch-arg": "nodes=4"}, "tapa submit sets --nodes itself"),
    "sbatch option not a name": (["tiny-cpu"], {"--sbatch-arg": "-N 4"}, "give sbatch's long option name"),
    "qos with a space": (["tiny-cpu"], {"--qos": "high prio"}, "--qos 'high prio': give one qos name"),
    "constraint the cluster lacks": (["tiny-cpu"], {"--constraint": "h100"}, "Slurm would not take the job ("),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=str)
def test_bad_input_is_refused_before_anything_is_submitted(case, slurm_cluster, novels_data, tmp_path, monkeypatch,
                                                           capsys):
    positional, changes, message = BAD_INPUT[case]
    options = {"--gpus-per-node": "0", "--tasks-per-node": "2", "--time": "00:10:00", **changes}
    argv = ["submit", *positional, *(item for key, value in options.items() if value is not None
                                     for item in (key, value)), f"data.path={novels_data}", "data.split=1,1,0"]
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)
    before = slurm_cluster.job_ids()
    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    assert message in str(refused.value.code)
    assert slurm_cluster.job_ids() == before
    assert list(tmp_path.iterdir()) == []  # no run directory, no log directory


def test_another_recipe_in_a_run_dir_is_refused_naming_both(reference, slurm_cluster, novels_data, monkeypatch):
    run_dir = reference["run_dir"]
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    jobs = slurm_cluster.job_ids()
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    with pytest.raises(SystemExit) as refused:
        cli.main(["submit", "tiny-cpu-extend", *CPU_JOB, "--tasks-per-node", "2", "--run-dir", str(run_dir),
                  f"data.path={novels_data}", "data.split=1,1,0"])
    message = str(refused.value.code)
    assert f"run dir {run_dir} holds a run of recipe 'tiny-cpu'" in message
    assert "this is recipe 'tiny-cpu-extend'" in message and "--force" in message
    assert slurm_cluster.job_ids() == jobs
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_dry_run_prints_the_batch_script_and_submits_nothing(slurm_cluster, novels_data, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)
    jobs = slurm_cluster.job_ids()
    cli.main(["submit", "tiny-cpu", *CPU_JOB, "--nodes", "2", "--tasks-per-node", "1", "--partition", "debug",
              "--signal-lead", "120", "--dry-run", f"data.path={novels_data}", "data.split=1,1,0"])
    printed = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --partition=debug",
                 f"#SBATCH --output={tmp_path}/runs/tiny-cpu/logs/slurm-%j.out",
                 f"set -- {cli.RECIPES_DIR}/tiny-cpu.yaml data.path={novels_data} data.split=1,1,0 "
                 f"run_dir={tmp_path}/runs/tiny-cpu",
                 "scontrol requeue"):
        assert line in printed
    assert "gpus-per-node" not in printed  # a CPU job asks for no GPUs
    assert slurm_cluster.job_ids() == jobs and list(tmp_path.iterdir()) == []


def test_dry_run_passes_sbatch_options_through_and_shows_the_chain(slurm_cluster, novels_data, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)
    jobs = slurm_cluster.job_ids()
    cli.main(["submit", "--chain", "tiny-cpu", "tiny-cpu-extend", *CPU_JOB, "--tasks-per-node", "2",
              "--exclusive", "--sbatch-arg", "mail-type=END", "--sbatch-arg", "overcommit", "--dry-run",
              f"data.path={novels_data}", "data.split=1,1,0"])
    printed = capsys.readouterr().out
    for line in ("#SBATCH --exclusive", "#SBATCH --mail-type=END", "#SBATCH --overcommit"):
        assert printed.count(line) == 2, line  # in both stages' scripts
    assert "# chain of 2 jobs: each waits for the one before to succeed" in printed
    assert f"stage 2 ($JOB_2) tiny-cpu-extend: {tmp_path}/runs/tiny-cpu-extend; waits on stage 1 (afterok:$JOB_1)" \
        in printed
    assert "# submitted as: sbatch --parsable --dependency=afterok:$JOB_1 --kill-on-invalid-dep=yes" in printed
    assert slurm_cluster.job_ids() == jobs and list(tmp_path.iterdir()) == []


def test_a_slurm_refusal_is_one_line(tmp_path, monkeypatch):
    """Slurm's commands print several error lines; the message keeps them all on one, so that the
    `# not checked with Slurm ...` line of --dry-run stays a comment."""
    from tapa_megatron.launch import slurm

    if shutil.which("sinfo") is None:
        pytest.skip("sinfo is not on PATH (Debian's slurm-client)")
    empty = tmp_path / "slurm.conf"
    empty.write_text("")
    monkeypatch.setenv("SLURM_CONF", str(empty))
    with pytest.raises(slurm.SlurmError) as refused:
        slurm.partitions()  # what tapa submit asks first
    message = str(refused.value)
    assert "\n" not in message and message.startswith("sinfo refused: ")
    assert "ClusterName needs to be specified; sinfo: fatal: Unable to process configuration file" in message
