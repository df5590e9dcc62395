#!/usr/bin/env bash
# One command, about five minutes on one H100, for every figure the CPU cannot measure
# (benchmarks/gpu_check.py says what it runs). Ends with one JSON line, also written to
# $OUT/gpu_check.json (else outputs/gpu_check.json).
#   bash scripts/gpu_check.sh            on a GPU
#   bash scripts/gpu_check.sh --dry      the same parts on the CPU, tiny (the test suite runs it)
# On a lent GPU machine, carry the wheels of scripts/gpu_wheels.sh (.whl/): they are installed
# into a scratch folder first, beside the machine's own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/engram_site .whl/*.whl
    export PYTHONPATH=/tmp/engram_site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "$PY" -m benchmarks.gpu_check "$@"
