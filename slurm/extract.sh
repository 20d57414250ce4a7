#!/usr/bin/env bash
# Extract features of a trained run on a Slurm allocation (srun + accelerate launch of `jaguar extract`),
# or, with COMMAND=match, its local pattern evidence (`jaguar match`: local features and shortlist matches).
#
#   mkdir -p logs && sbatch [RESOURCES] slurm/extract.sh RUN_DIR [--split test] [other `jaguar extract` options]
#   sbatch --nodes=2 --gpus-per-node=8 --cpus-per-task=64 slurm/extract.sh runs/jaguar-train-123456 --split test
#   COMMAND=match sbatch --nodes=4 --cpus-per-task=32 slurm/extract.sh runs/jaguar-train-123456 --split test
#
# Resources and devices as in slurm/train.sh: GPUs when the job has them, else CPU processes (gloo).
#
# Submit from the repository root (the job works in $SLURM_SUBMIT_DIR).  Every image is extracted
# exactly once whatever the number of processes; re-running a finished extraction is a no-op.  The same
# holds for `jaguar match` (each image's shortlist matched once; its finished blocks reused on a re-run).
#
#SBATCH --job-name=jaguar-extract
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

# ------------------------------------------------------------------ settings (export to change)
JOB_ID="${SLURM_JOB_ID:?slurm/extract.sh must run inside a Slurm job: submit it with sbatch}"
VENV="${VENV:-.venv}"             # activated when it exists
MODULES="${MODULES:-}"            # e.g. "cuda/12.4": loaded with `module load` when set
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-}"  # empty = chosen from the node and process counts
DEVICE="${DEVICE:-auto}"         # gpu | cpu | auto: GPUs when the node has any, else CPU (gloo)
PROCESSES_PER_NODE="${PROCESSES_PER_NODE:-}"  # empty = one per GPU, or 1 on CPU
COMMAND="${COMMAND:-extract}"     # extract (global features) | match (local features + shortlist matches)

log() { echo "[extract.sh $(date '+%F %T')] $*"; }
die() { echo "[extract.sh] error: $*" >&2; exit 2; }

case "$COMMAND" in extract|match) ;; *) die "COMMAND=$COMMAND: it must be extract or match" ;; esac

cd "${SLURM_SUBMIT_DIR:-$PWD}"
[ -d launch ] || die "no launch/ folder in $PWD: submit from the jaguar repository root"

[ $# -ge 1 ] || die "no run directory given: sbatch slurm/extract.sh RUN_DIR [--split test] ..."
RUN_DIR="$1"
shift
[[ "$RUN_DIR" != -* ]] || die "the first argument must be the run directory, got option '$RUN_DIR'"
[ -d "$RUN_DIR" ] || die "run directory '$RUN_DIR' not found in $PWD: give the run.dir of a finished training run"

# shellcheck source=slurm/allocation.sh
source slurm/allocation.sh


log "job $JOB_ID on $NNODES node(s) x $PROCESSES_PER_NODE $DEVICE process(es): jaguar $COMMAND $RUN_DIR $*"

# One task per node; SLURM_NODEID is only known inside the task, hence the single quotes.
status=0
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' jaguar-node \
  --config_file "$ACCELERATE_CONFIG" \
  --num_machines "$NNODES" \
  --num_processes "$NUM_PROCESSES" \
  --main_process_ip "$MASTER_ADDR" \
  --main_process_port "$MASTER_PORT" \
  -m jaguar.cli.main "$COMMAND" "$RUN_DIR" "$@" || status=$?

if [ "$status" -eq 0 ]; then
  log "jaguar $COMMAND finished: its output is in $RUN_DIR"
else
  log "jaguar $COMMAND failed with status $status"
fi
exit "$status"
