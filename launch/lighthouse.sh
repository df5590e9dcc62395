# Sourced by launch/run_local.sh and launch/slurm/train_ft.sbatch (from the repository root).
#   start_lighthouse PORT DEFAULT_JOIN_TIMEOUT_MS [LOG]
# starts torchft's lighthouse in the background (its pid in LIGHTHOUSE_PID; its output into LOG
# when given), the binary found beside $PYTHON (a venv) or on PATH; returns 2 with a message
# when torchft is not installed. FT_MIN_REPLICAS, FT_QUORUM_TICK_MS and FT_JOIN_TIMEOUT_MS
# override its settings.
start_lighthouse() {
  local bin
  bin=$(dirname "$PYTHON")/torchft_lighthouse
  [ -x "$bin" ] || bin=torchft_lighthouse
  if ! command -v "$bin" >/dev/null; then
    echo "torchft_lighthouse not found: pip install -e '.[ft]'" >&2
    return 2
  fi
  local cmd=("$bin" --min_replicas "${FT_MIN_REPLICAS:-1}" --bind "[::]:$1"
    --quorum_tick_ms "${FT_QUORUM_TICK_MS:-100}" --join_timeout_ms "${FT_JOIN_TIMEOUT_MS:-$2}")
  if [ -n "${3:-}" ]; then
    "${cmd[@]}" > "$3" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  LIGHTHOUSE_PID=$!
}
