#!/usr/bin/env bash
# README command (2): set up .venv and run the default (fast) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/python -m pytest -q "$@"
