import os

import pytest

from tests.launch.local_slurm import LocalSlurm, have_slurm


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A two-node Slurm cluster on this machine, for the whole session; stopped (by PID) at the end."""
    if not have_slurm():
        pytest.skip("Slurm is not installed: scripts/setup.sh installs slurmctld, slurmd and slurm-client "
                    "with apt-get (as root)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root: slurmd starts each job as its user")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
