#!/usr/bin/env bash
# One node's share of a slurm job (started by train.sbatch through srun, one task per node):
# torchrun with a c10d rendezvous at the allocation's first node, and preemption signals routed
# to the trainers, which checkpoint at the next step boundary and exit 0 (pretrain/preemption.py).
#   SIGUSR1: torchrun ignores it (inherited SIG_IGN; the trainers install their own handler) and
#            this shell forwards it to the trainers, whichever of them slurm signalled.
#   SIGTERM: torchrun forwards it to the trainers itself.
# Environment (set by train.sbatch): HEAD PORT GPUS_PER_NODE PYTHON SLURM_NNODES SLURM_NODEID
# SLURM_JOB_ID; LOG_DIR for per-rank logs.
set -uo pipefail
trap '' USR1
# Node count and rank are the job step's (train_ft.sbatch runs one step per replica group);
# RDZV_ID and MAX_RESTARTS (torchrun restarts a failed replica group) are optional.
NNODES=${SLURM_STEP_NUM_NODES:-$SLURM_NNODES}
NODE_RANK=${SLURM_PROCID:-$SLURM_NODEID}  # one task per node
"$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK" \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "${RDZV_ID:-$SLURM_JOB_ID}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  --log-dir "$LOG_DIR/node$NODE_RANK" --redirects 3 --tee 3 \
  -m pretrain.train "$@" &
AGENT=$!
trap 'pkill -USR1 -P "$AGENT" || true' USR1
trap 'kill -TERM "$AGENT" 2>/dev/null || true' TERM
while true; do
  wait "$AGENT"
  status=$?
  kill -0 "$AGENT" 2>/dev/null || break  # a trapped signal interrupted wait: keep waiting
done
exit "$status"
