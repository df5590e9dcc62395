#!/usr/bin/env bash
# One node: torchrun with N processes (default: all GPUs, or 2 CPU processes with gloo).
#   NGPU=8 launch/run_local.sh --config launch/configs/moe_27b.toml [--section.key=value ...]
# Fault tolerance (docs/fault_tolerance.md): FT_REPLICAS=R starts a torchft lighthouse and R
# replica groups of NGPU processes each (one torchrun per group; group g gets GPUs
# g*NGPU .. (g+1)*NGPU-1). torchrun restarts a group whose process dies (FT_MAX_RESTARTS, 3), and
# the restarted group recovers from a live peer while the others train on.
#   FT_REPLICAS=2 NGPU=2 launch/run_local.sh --config pretrain/configs/debug_ft.toml
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ -z "${NGPU:-}" ]; then
  if [ -n "${FT_REPLICAS:-}" ] && [ "$GPUS" -gt 0 ]; then
    NGPU=$(( GPUS / FT_REPLICAS ))
  else
    NGPU=$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)
  fi
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# a rank that dies makes the others fail within the process-group timeout instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
if [ -z "${FT_REPLICAS:-}" ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" -m pretrain.train "$@"
fi

# ----- fault tolerance: a lighthouse and FT_REPLICAS replica groups -----
source launch/lighthouse.sh
LIGHTHOUSE_PORT=${LIGHTHOUSE_PORT:-29510}
export RUST_LOG=${RUST_LOG:-warn}
start_lighthouse "$LIGHTHOUSE_PORT" 10000 || exit 2
PIDS=("$LIGHTHOUSE_PID")
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
export TORCHFT_LIGHTHOUSE=http://localhost:$LIGHTHOUSE_PORT
status=0
for ((group = 0; group < FT_REPLICAS; group++)); do
  if [ "$GPUS" -gt 0 ]; then
    export CUDA_VISIBLE_DEVICES=$(seq -s, $(( group * NGPU )) $(( (group + 1) * NGPU - 1 )))
  fi
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" \
    --max-restarts "${FT_MAX_RESTARTS:-3}" -m pretrain.train "$@" \
    --fault_tolerance.enable=true --fault_tolerance.replica_id="$group" \
    --fault_tolerance.group_size="$FT_REPLICAS" &
  PIDS+=($!)
done
for pid in "${PIDS[@]:1}"; do
  wait "$pid" || status=$?
done
exit "$status"
