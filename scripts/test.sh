#!/usr/bin/env bash
# README command (2): set up .venv and run the tests.
#   bash scripts/test.sh            the default set: CPU unit tests and one 2-rank gloo test per
#                                   parallelism (about 10 minutes on 2 cores)
#   bash scripts/test.sh --all      everything CI runs: the default set plus the slow twins
#   bash scripts/test.sh ARGS...    other arguments go to pytest (a file, -k NAME, ...)
# docs/testing.md says which tests are where and why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export OMP_NUM_THREADS=1  # every test process and every rank it spawns: one torch thread
select=()
rest=()
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then
    select=(-m "not gpu")  # replaces pytest.ini's "not slow and not gpu"
  else
    rest+=("$arg")
  fi
done
exec .venv/bin/python -m pytest -q --durations=25 "${select[@]}" "${rest[@]}"
