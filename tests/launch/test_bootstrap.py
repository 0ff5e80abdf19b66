"""detect_launch: each launcher's environment gives the right rank, world and rendezvous (MPI itself runs
in test_launchers.py)."""

import pytest

from tapa_megatron.train.distributed import Launch, detect_launch, first_host, slurm_port

SRUN_STEP = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]"}


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert detect_launch(env) == Launch("torchrun", 5, 8, 1, "10.0.0.1", 29500)


def test_torchrun_started_by_srun_is_torchrun():
    env = {**SRUN_STEP, "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "gpu007",
           "MASTER_PORT": "29500"}
    assert detect_launch(env) == Launch("torchrun", 6, 8, 2, "gpu007", 29500)


def test_srun_step():
    assert detect_launch(SRUN_STEP) == Launch("srun", 3, 4, 1, "gpu007", slurm_port(1234))
    assert detect_launch({**SRUN_STEP, "MASTER_ADDR": "192.168.1.7", "MASTER_PORT": "2222"}) == \
        Launch("srun", 3, 4, 1, "192.168.1.7", 2222)


def test_srun_with_its_pmi2_plugin_is_still_srun():
    assert detect_launch({**SRUN_STEP, "PMI_SIZE": "4", "PMI_RANK": "3"}).launcher == "srun"


def test_a_batch_script_without_srun_is_a_single_process():
    """The batch step has SLURM_PROCID and SLURM_NTASKS of the whole job, but it is one process."""
    env = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert detect_launch(env) == Launch("single", 0, 1, 0, "127.0.0.1", 0)


def test_rank_without_a_rendezvous_is_refused():
    with pytest.raises(ValueError, match="MASTER_ADDR / MASTER_PORT are not"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("nodelist,first", [
    ("n1", "n1"), ("n[1-2]", "n1"), ("gpu-a[007-009,012],cpu1", "gpu-a007"), ("node3,node1", "node3"),
    ("rack[4,2]", "rack4"),
])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first
