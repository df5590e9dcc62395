#!/usr/bin/env bash
# Create .venv in the repository root and install the project (CPU torch pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import models, data, pretrain, torch, pytest" >/dev/null 2>&1 || [ "${FORCE_INSTALL:-0}" = 1 ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c constraints-cpu.txt "torch==2.13.0"
  python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
fi
