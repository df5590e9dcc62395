#!/usr/bin/env bash
# Create .venv in the repository root and install the project (CPU torch pinned). Re-installs when
# setup.py or the constraints change (a stamp of their hash is kept in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=$(cat setup.py constraints-cpu.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.engram_stamp 2>/dev/null)" != "$stamp" ]; then
  echo "installing the project into .venv (CPU torch 2.13.0) ..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints-cpu.txt "torch==2.13.0"
  extras=dev,hf,megatron,data,eval
  # torchft (fault tolerance) and torchao (FP8) ship wheels for Linux x86_64 only
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then extras=$extras,ft,fp8; fi
  .venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[$extras]"
  echo "$stamp" > .venv/.engram_stamp
fi
