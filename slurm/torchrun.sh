#!/bin/bash
# Runs inside a Slurm allocation (from an sbatch script): one srun task per node, each starting
# torchrun with a static rendezvous on the head node, ending in `python -m MODULE OVERRIDES...`.
#
#   slurm/torchrun.sh runtime.generate model=gpt-oss-120b parallel.tp_size=8 ...
#
# Environment (all optional):
#   GPTOSS_PROCS_PER_NODE  ranks per node (default: GPUs on the node, else 1)
#   GPTOSS_PORT            rendezvous port (default: 20000 + job id % 20000, fixed per job)
#   GPTOSS_RUN_DIR         where logs/ and the STOP file live (default: the submit directory)
#   GPTOSS_PYTHON          interpreter on the nodes (default: python3)
#   GPTOSS_REQUEUE         1 (default): on USR1/TERM, stop after the current batch and requeue
#
# Preemption: the batch shell traps USR1/TERM (sbatch --signal=B:USR1@120 sends USR1 before the time
# limit) and creates $GPTOSS_RUN_DIR/STOP; rank 0 sees it between batches, all ranks stop after the
# current batch with everything flushed (rank 0 then writes STOPPED), and this script requeues the
# job. The requeued run skips the prompts already written. signal_seconds must exceed one batch.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 MODULE [OVERRIDES...]   (e.g. runtime.generate parallel.tp_size=8)" >&2
    exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "$0: not inside a Slurm job; submit with sbatch (or run torchrun directly)" >&2
    exit 2
fi
MODULE=$1
shift

RUN_DIR=${GPTOSS_RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${GPTOSS_PYTHON:-python3}
NNODES=${SLURM_JOB_NUM_NODES:-1}
PROCS=${GPTOSS_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
PORT=${GPTOSS_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# The rendezvous host is the allocation's first node, by address: node names need not resolve.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}

mkdir -p "$RUN_DIR/logs"
export GPTOSS_STOP_FILE="$RUN_DIR/STOP"
STOPPED="${GPTOSS_STOP_FILE}PED"  # written by rank 0 when it stopped early with prompts left
rm -f "$GPTOSS_STOP_FILE" "$STOPPED"
trap 'echo "[torchrun.sh] $(date -Is) stop requested: ranks stop at their next check"; touch "$GPTOSS_STOP_FILE"' USR1 TERM

echo "[torchrun.sh] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $PROCS rank(s)," \
     "rendezvous $HEAD_ADDR:$PORT, -m $MODULE $*"
if [ "$MODULE" = runtime.serve ]; then
    echo "[torchrun.sh] the server (rank 0) runs on the head node $HEAD_NODE ($HEAD_ADDR): its URL is logged" \
         "in $RUN_DIR/logs/node0.log and written to endpoint.json in serve.out_dir once it answers"
fi

# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): pass it on, or the ranks share one CPU.
CPUS=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
# SLURM_NODEID must be read on each node, hence the single-quoted script run by srun.
# shellcheck disable=SC2016
srun --ntasks-per-node=1 "${CPUS[@]}" --kill-on-bad-exit=1 --output="$RUN_DIR/logs/node%n.log" bash -c '
    exec "$0" -m torch.distributed.run --nnodes="$1" --nproc_per_node="$2" --node-rank="$SLURM_NODEID" \
        --master-addr="$3" --master-port="$4" --log-dir="$5/logs/node$SLURM_NODEID" --redirects=3 --tee=3 \
        -m "${@:6}"' "$PYTHON" "$NNODES" "$PROCS" "$HEAD_ADDR" "$PORT" "$RUN_DIR" "$MODULE" "$@" &
pid=$!
# A trapped signal interrupts `wait`: keep waiting until srun has really ended.
rc=0
while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
done

# Requeue only a run that stopped with prompts left (not one that finished while the stop was asked).
if [ -e "$STOPPED" ] && [ "${GPTOSS_REQUEUE:-1}" = 1 ]; then
    echo "[torchrun.sh] $(date -Is) stopped early (srun exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    # Not COMPLETED: prompts are left. 75 (EX_TEMPFAIL) as the runtime's own stop: run it again to finish.
    echo "[torchrun.sh] requeue refused: prompts are left; resubmit the job to finish them" >&2
    exit 75
fi
exit "$rc"
