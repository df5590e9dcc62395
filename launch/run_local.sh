#!/usr/bin/env bash
# One node: torchrun with N processes (default: all GPUs, or 2 CPU processes with gloo).
#   NGPU=8 launch/run_local.sh --config launch/configs/moe_27b.toml [--section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [ -z "${NGPU:-}" ]; then
  NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# a rank that dies makes the others fail within the process-group timeout instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" -m pretrain.train "$@"
