#!/usr/bin/env bash
# Creates .venv and installs tapa-megatron into it (editable, with the dev extras).
# On a machine without an NVIDIA GPU, the CPU build of PyTorch goes in first: an unpinned torch
# would resolve to the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}  # CI's second leg: PYTHON=python3.12 VENV=.venv312 (megatron-core 0.19)
if ! "$PYTHON" -c '' 2>/dev/null; then  # not on PATH (or a pyenv shim of a version not selected): pyenv's own
  found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"${PYTHON#python}".*/bin/"$PYTHON" 2>/dev/null | sort -V | tail -1)
  [[ -n $found ]] || { echo "setup.sh: $PYTHON not found on PATH or under pyenv; install it or set PYTHON=/path/to/python" >&2; exit 2; }
  PYTHON=$found
fi
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # Python 3.11: the CPU build; for 3.12 PyPI has only the CUDA build (its nvidia-* libraries, ~4.7 GB
  # installed, are linked at import, so --no-deps does not work; measured ~2 min to install, runs on CPU)
  "$VENV/bin/pip" install -q torch==2.13.0
fi
"$VENV/bin/pip" install -q -e '.[dev,deepspeed]'  # DeepSpeed's sdist builds without torch; the CPU torch above serves it
# The launch tests (tests/launch) start a private Slurm cluster on this machine and run an MPI launch:
# Slurm's daemons and client from Debian (as root, only where missing), mpi4py with MPICH's wheel in the venv.
if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && ! dpkg -s slurmctld slurmd slurm-client >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null
fi
"$VENV/bin/pip" install -q mpi4py mpich
