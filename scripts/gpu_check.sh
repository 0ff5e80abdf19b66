#!/usr/bin/env bash
# On a lent GPU machine, in one call of under 10 minutes: `tapa selfcheck` (every check, GPU side),
# `tapa bench attention` (8K..128K, Triton TAPA beside SDPA-flash, cuDNN and the eager reference) and the
# Triton kernel tests compiled for the GPU instead of the interpreter. Logs, the JSON report and the plot
# go to $OUT, which the device tool brings back.
#   here, once:   bash scripts/gpu_wheels.sh
#   the device:   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# PYTHON picks the interpreter (default python3, the image's, which holds torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/tapa-site}
mkdir -p "$OUT"
# The carried wheels and this checkout, beside the image's packages: nothing is fetched.
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$SITE" . || exit 1
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name (limit $limit s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

stage versions 60 bash -c "nvidia-smi; \"$PYTHON\" -c 'import torch, triton, megatron.core as m; \
print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"megatron-core\", m.__version__)'"
stage selfcheck 330 "$PYTHON" -m tapa_megatron.cli selfcheck --out "$OUT/selfcheck.json"
stage bench 150 "$PYTHON" -m tapa_megatron.cli bench attention --plot "$OUT/bench.png"
stage kernel-tests 60 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/ops/test_triton.py
