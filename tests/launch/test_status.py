"""tapa status: a real CPU run's directory read back (against what the training printed), and a chain on
the local Slurm cluster (local_slurm.py) with each job's state from squeue."""

import json
import re
import subprocess
import sys

import pytest

from tapa_megatron.launch import status as run_status
from tests.launch.test_slurm import CPU_JOB, TRAINING, job_ids, tapa_submit


def tapa(*args, env=None, cwd=None):
    result = subprocess.run([sys.executable, "-m", "tapa_megatron.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=600, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def logged(stdout):
    """(step, loss, tok/s) of every console line the training printed."""
    return [(int(step), float(loss), float(rate.replace(",", "")))
            for step, loss, rate in re.findall(r"step (\d+)/\d+ \| loss (\S+) \|.*?\| ([\d,]+) tok/s", stdout)]


def test_status_of_a_cpu_run_from_its_directory_alone(novels_data, tmp_path):
    run_dir = tmp_path / "run"
    train = ["train", "tiny-cpu", f"run_dir={run_dir}", f"data.path={novels_data}", "data.split=1,1,0",
             "training.steps=4", "training.log_every=1", "training.eval_every=2", "training.eval_iters=1",
             "training.tensorboard=false", "optimizer.warmup_steps=1"]
    stdout = tapa(*train, "training.exit_after_steps=3")  # stops after step 3 of 4, checkpointed
    step, loss, rate = logged(stdout)[-1]
    assert step == 3

    status = json.loads(tapa("status", run_dir, "--json", "--no-slurm"))
    assert status["name"] == "tiny-cpu" and status["step"] == 3 and status["total_steps"] == 4
    assert not status["finished"]
    assert status["loss"] == pytest.approx(loss, abs=5e-5) and status["loss_step"] == 3  # printed with 4 decimals
    assert round(status["tokens_per_s"]) == rate
    assert status["newest_checkpoint"] == str(run_dir / "checkpoints" / "step_00000003")
    assert status["eta_seconds"] == pytest.approx(status["seconds_per_step"] * 1)
    validation = re.findall(r"step (\d+)/4 \| lm loss validation (\S+)", stdout)
    assert [(status["validation"]["step"], status["validation"]["loss"])] == \
        [(int(s), pytest.approx(float(v), abs=5e-5)) for s, v in validation]
    assert status["jobs"] == []

    stdout = tapa(*train)  # resumes and finishes
    step, loss, _ = logged(stdout)[-1]
    text = tapa("status", run_dir, "--no-slurm")
    assert "step        4 of 4 (100%), finished" in text
    assert f"last loss   {loss:.4f} at step 4" in text
    assert f"checkpoint  {run_dir}/checkpoints/step_00000004 (step 4)" in text
    assert "ETA" not in text and "jobs        none submitted with tapa submit" in text

    # `tapa status` reads plain files: it never loads megatron-core (seconds to import, on every call).
    loaded = subprocess.run([sys.executable, "-c", "import sys; from tapa_megatron.cli import main; "
                             f"main(['status', {str(run_dir)!r}, '--no-slurm']); "
                             "print(sorted(m for m in ('megatron.core', 'transformers') if m in sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert loaded == "[]"


def test_status_refuses_a_directory_that_holds_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(run_status.StatusError, match="is not a run directory .* and holds none"):
        run_status.run(tmp_path / "empty")
    with pytest.raises(run_status.StatusError, match="is not a directory"):
        run_status.run(tmp_path / "missing")


def test_status_of_a_chain_shows_each_job_from_squeue(slurm_cluster, novels_data, tmp_path):
    parent = tmp_path / "runs"
    stdout = tapa_submit(slurm_cluster, "--chain", "tiny-cpu", "tiny-cpu-extend", *CPU_JOB, "--tasks-per-node", 1,
                         "--run-dir", parent, f"data.path={novels_data}", *TRAINING, "training.steps=2",
                         "--sbatch-arg", "hold", cwd=tmp_path)  # held: both still queued when status asks
    first, second = job_ids(stdout)
    waiting = json.loads(tapa("status", parent, "--json", env=slurm_cluster.env))
    assert [stage["name"] for stage in waiting] == ["tiny-cpu", "tiny-cpu-extend"]  # submission order
    assert [[(job["id"], job["state"]) for job in stage["jobs"]] for stage in waiting] == \
        [[(first, "PENDING")], [(second, "PENDING")]]
    assert waiting[0]["jobs"][0]["reason"] == "JobHeldUser"
    slurm_cluster.run("scontrol", "release", first, second)

    for job_id, stage in ((first, "tiny-cpu"), (second, "tiny-cpu-extend")):
        slurm_cluster.wait_for(job_id, "COMPLETED", log=parent / stage / "logs" / f"slurm-{job_id}.out")
    text = tapa("status", parent, env=slurm_cluster.env)
    for job_id, stage in ((first, "tiny-cpu"), (second, "tiny-cpu-extend")):
        assert f"{stage}  {parent / stage}" in text
        assert re.search(rf"job {job_id} +COMPLETED, elapsed [\d:]+; log says: finished", text)
        assert f"checkpoint  {parent / stage}/checkpoints/step_00000002 (step 2)" in text
    assert text.count("step        2 of 2 (100%), finished") == 2
