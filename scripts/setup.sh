#!/usr/bin/env bash
# Creates .venv and installs tapa-megatron into it (editable, with the dev extras).
# On a machine without an NVIDIA GPU, the CPU build of PyTorch goes in first: an unpinned torch
# would resolve to the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q torch==2.13.0
fi
"$VENV/bin/pip" install -q -e '.[dev]'
