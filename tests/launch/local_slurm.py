"""A real Slurm cluster on this machine for the tests: slurmctld and one slurmd per node (n1, n2), all on
127.0.0.1 with their own ports, configured in a temporary directory. No accounting, no munge (auth/none).

    cluster = LocalSlurm(tmp_dir).start()      # returns once both nodes are idle
    job_id = ...                                # sbatch / tapa submit with cluster.env
    cluster.wait_for(job_id, "COMPLETED")
    cluster.stop()                              # cancels what is left, stops the daemons by PID
"""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def daemon(name):
    """The path of a Slurm daemon: Debian puts them in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        # Jobs inherit this environment (sbatch exports it): keep no launcher variables of the test process.
        launcher_variables = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
        self.env = {**{k: v for k, v in os.environ.items() if k not in launcher_variables},
                    "SLURM_CONF": str(self.conf)}
        self.daemons = []  # (name, Popen, its console log file)

    def _write_config(self):
        for sub in ("state", "log", *(f"spool/{node}" for node in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={node} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={CPUS_PER_NODE} State=UNKNOWN"
                          for node in NODES)
        self.conf.write_text(f"""\
ClusterName=tapatest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
JobRequeue=1
EnforcePartLimits=ALL
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout=30):
        self._write_config()
        commands = [("slurmctld", [daemon("slurmctld"), "-D", "-f", str(self.conf)])]
        commands += [(f"slurmd {node}", [daemon("slurmd"), "-D", "-N", node, "-f", str(self.conf)]) for node in NODES]
        for name, command in commands:
            console = open(self.root / "log" / f"{name.replace(' ', '-')}.console", "w")
            process = subprocess.Popen(command, env=self.env, stdout=console, stderr=subprocess.STDOUT)
            self.daemons.append((name, process, console))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return self
            for name, process, _ in self.daemons:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.logs()}")
            time.sleep(0.3)
        raise RuntimeError(f"the local Slurm nodes did not become idle in {timeout} s:\n{self.logs()}")

    def stop(self):
        """Cancel every job still known, wait for them to end, then stop the daemons (by PID)."""
        if self.daemons and self.daemons[0][1].poll() is None:
            jobs = self.run("squeue", "--noheader", "--format=%i", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while self.run("squeue", "--noheader", "--format=%i", check=False).split() and \
                        time.monotonic() < deadline:
                    time.sleep(0.5)
        for _, process, _ in reversed(self.daemons):
            process.terminate()
        for _, process, console in reversed(self.daemons):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            console.close()
        self.daemons = []

    def idle(self):
        """Every node idle: no job on it, none still being cleaned up."""
        states = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False).split()
        return states == ["idle"] * len(NODES)

    def logs(self, lines=20):
        tails = []
        for path in sorted((self.root / "log").iterdir()):
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def run(self, *args, check=True):
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def job(self, job_id):
        """scontrol's fields of a job: JobState, Restarts, Dependency, NodeList, ..."""
        text = self.run("scontrol", "--oneliner", "show", "job", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def job_ids(self):
        """Every job the controller still knows of (finished ones stay for MinJobAge, 300 s)."""
        text = self.run("scontrol", "--oneliner", "show", "jobs", check=False)
        return set(re.findall(r"^JobId=(\d+)", text, flags=re.M))

    def wait_for(self, job_id, state, timeout=180, log=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.job(job_id)["JobState"]
            if current == state:
                return
            if current in FINISHED:
                break
            time.sleep(0.5)
        tail = Path(log).read_text(errors="replace")[-3000:] if log and Path(log).is_file() else "(no log)"
        raise AssertionError(f"job {job_id} is {current}, not {state}. Its log:\n{tail}\n{self.logs()}")


def have_slurm():
    return all(daemon(tool) for tool in ("slurmctld", "slurmd")) and all(shutil.which(tool) for tool in
                                                                        ("sbatch", "scontrol", "squeue", "sinfo"))
