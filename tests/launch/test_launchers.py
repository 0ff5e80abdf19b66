"""The same two-rank training started by mpiexec (mpi4py bootstrap) and by torchrun reaches the same
first-step loss. MPICH's mpiexec and mpi4py come from PyPI into the venv (scripts/setup.sh)."""

import os
import re
import subprocess
import sys
from pathlib import Path

TRAINING = ["data.split=1,1,0", "data.seq_length=32", "training.steps=1", "training.global_batch_size=4",
            "training.micro_batch_size=2", "training.tensorboard=false", "optimizer.warmup_steps=0"]


def train_with(launcher, run_dir, data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank under both launchers: same float sums
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [*launcher, "-m", "tapa_megatron.cli", "train", "tiny-cpu", f"run_dir={run_dir}", f"data.path={data}",
               *TRAINING]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_mpiexec_reaches_the_same_first_step_loss_as_torchrun(novels_data, tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.is_file(), "no mpiexec in the venv: scripts/setup.sh installs mpi4py and MPICH's wheel"
    mpi = train_with([str(mpiexec), "-n", "2", sys.executable], tmp_path / "mpi", novels_data)
    torchrun = train_with([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"],
                          tmp_path / "torchrun", novels_data)
    assert "[launch] mpi: rank 0 of 2" in mpi and "[launch] torchrun: rank 0 of 2" in torchrun
    losses = [re.search(r"step 1/1 \| loss (\S+)", out).group(1) for out in (mpi, torchrun)]
    assert losses[0] == losses[1]
