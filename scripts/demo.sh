#!/usr/bin/env bash
# README command (1): set up .venv, prepare the real demo corpus if missing, train the demo on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python -m pretrain.train --config pretrain/configs/demo.toml "$@"
