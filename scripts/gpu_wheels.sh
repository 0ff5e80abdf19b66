#!/usr/bin/env bash
# Run here, where PyPI is reachable: the wheels a lent GPU machine (the `device` tool) lacks, into .whl/
# (git ignores it; the tool carries it). Its image has Python 3.12, torch 2.11, Triton 3.6, transformers,
# tokenizers, safetensors, matplotlib, tensorboard, pandas, xarray, pytest; not megatron-core or rdata
# (/work/.library/device/KINDS.md). Then: run(command="bash scripts/gpu_check.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "megatron-core>=0.19,<0.20" "rdata>=1.0"
ls -l .whl
