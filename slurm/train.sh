#!/usr/bin/env bash
# Train a jaguar recipe on one or many Slurm nodes (srun + accelerate launch), requeue on preemption.
#
#   mkdir -p logs && sbatch [RESOURCES] slurm/train.sh [RECIPE] [key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 slurm/train.sh recipes/eva02_large.py optim.lr=1e-4
#   sbatch --nodes=2 --cpus-per-task=32 slurm/train.sh recipes/tiny_cpu.py   # CPU nodes: gloo
#   RUN_DIR=runs/eva02-a sbatch --gpus-per-node=8 slurm/train.sh      # continue that run in a new job
#
# GPUs and CPUs are requested on the sbatch command line, not below: a #SBATCH --gpus-per-node would
# make sbatch refuse the job on a partition without GPUs.  Nodes without GPUs (or DEVICE=cpu) run
# CPU processes that talk over gloo, with the same preemption and requeue.
#
# Submit from the repository root: the job works in $SLURM_SUBMIT_DIR and every path below
# (recipe, launch/*.yaml, runs/) is relative to it.  Slurm does not create the logs/ folder.
#
# Preemption: Slurm sends USR1 300 s before the time limit.  The script then touches
# $RUN_DIR/PREEMPT (the trainer checks it at every optimizer step, saves a checkpoint and exits 0),
# waits for the step to finish, and requeues the job.  The requeued job keeps its job id, hence
# the same default RUN_DIR, and `train.resume=auto` continues from the newest checkpoint.
#
#SBATCH --job-name=jaguar-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

# ------------------------------------------------------------------ settings (export to change)
RECIPE="${RECIPE:-recipes/eva02_large.py}"
JOB_ID="${SLURM_JOB_ID:?slurm/train.sh must run inside a Slurm job: submit it with sbatch}"
RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-jaguar-train}-${JOB_ID}}"  # job id survives requeue
SHARDS="${SHARDS:-}"              # data.shards for the trainer; empty = the recipe's value
VENV="${VENV:-.venv}"             # activated when it exists
MODULES="${MODULES:-}"            # e.g. "cuda/12.4 gcc/12": loaded with `module load` when set
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-}"  # empty = chosen from the node and process counts
DEVICE="${DEVICE:-auto}"         # gpu | cpu | auto: GPUs when the node has any, else CPU (gloo)
PROCESSES_PER_NODE="${PROCESSES_PER_NODE:-}"  # empty = one per GPU, or 1 on CPU
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"

log() { echo "[train.sh $(date '+%F %T')] $*"; }
die() { echo "[train.sh] error: $*" >&2; exit 2; }

cd "${SLURM_SUBMIT_DIR:-$PWD}"
[ -d launch ] || die "no launch/ folder in $PWD: submit from the jaguar repository root"

# The first argument is the recipe unless it is already a key=value override.
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
  RECIPE="$1"
  shift
fi
OVERRIDES=("$@")
[ -n "$RECIPE" ] || die "no recipe given: pass recipes/NAME.py (or a .yaml) or export RECIPE"
[ -f "$RECIPE" ] || die "recipe '$RECIPE' not found in $PWD: give a recipes/*.py or .yaml path relative to the repository root"

# A run.dir given as an override wins: the PREEMPT file must land where the trainer looks.
has_run_dir=0
for item in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  if [[ "$item" == run.dir=* ]]; then
    RUN_DIR="${item#run.dir=}"
    has_run_dir=1
  fi
  if [[ "$item" == train.resume=* ]]; then
    die "do not pass '$item': this script always resumes (train.resume=auto); use a new RUN_DIR to start afresh"
  fi
done
[ -n "$RUN_DIR" ] || die "RUN_DIR is empty: export RUN_DIR=runs/NAME or pass run.dir=runs/NAME"

# shellcheck source=slurm/allocation.sh
source slurm/allocation.sh


# A .py recipe is the training script itself; a .yaml config goes through `jaguar train`.
if [[ "$RECIPE" == *.py ]]; then
  PROGRAM=("$RECIPE")
else
  PROGRAM=(-m jaguar.cli.main train "$RECIPE")
fi
TRAIN_ARGS=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
[ "$has_run_dir" -eq 1 ] || TRAIN_ARGS+=("run.dir=$RUN_DIR")
TRAIN_ARGS+=("train.resume=auto")
[ -z "$SHARDS" ] || TRAIN_ARGS+=("data.shards=$SHARDS")

mkdir -p "$RUN_DIR"
# A PREEMPT left by a job killed before the trainer saw it would stop this run at its first step.
rm -f "$RUN_DIR/PREEMPT"

log "job $JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) x $PROCESSES_PER_NODE $DEVICE process(es): $SLURM_JOB_NODELIST"
log "recipe $RECIPE, run dir $RUN_DIR, accelerate config $ACCELERATE_CONFIG, rendezvous $MASTER_ADDR:$MASTER_PORT"

# ------------------------------------------------------------------ launch and preemption
preempted=0
interrupted=0
srun_pid=""
on_signal() {
  local name="$1"
  interrupted=1
  log "received SIG$name: asking the trainer to checkpoint and stop (touch $RUN_DIR/PREEMPT)"
  touch "$RUN_DIR/PREEMPT"
  if [ "$name" = USR1 ]; then
    preempted=1
  fi
  if [ -n "$srun_pid" ]; then
    kill "-$name" "$srun_pid" 2>/dev/null || true
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# One task per node; SLURM_NODEID is only known inside the task, hence the single quotes.  The
# launcher ignores USR1 (its default action would kill it and with it the workers mid-checkpoint);
# the trainer installs its own handler, and the PREEMPT file reaches it regardless.
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'trap "" USR1; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' jaguar-node \
  --config_file "$ACCELERATE_CONFIG" \
  --num_machines "$NNODES" \
  --num_processes "$NUM_PROCESSES" \
  --main_process_ip "$MASTER_ADDR" \
  --main_process_port "$MASTER_PORT" \
  "${PROGRAM[@]}" "${TRAIN_ARGS[@]}" &
srun_pid=$!

# `wait` returns early when a trapped signal arrives; wait again until srun itself has ended.
while :; do
  interrupted=0
  status=0
  wait "$srun_pid" || status=$?
  [ "$interrupted" -eq 1 ] || break
done
trap - USR1 TERM

if [ "$preempted" -eq 1 ]; then
  if [ "$status" -eq 0 ]; then
    log "trainer checkpointed; requeueing job $JOB_ID (it resumes from $RUN_DIR)"
    scontrol requeue "$JOB_ID"
  else
    log "trainer exited with status $status after the preemption signal: not requeueing (see the log above)"
  fi
elif [ "$status" -eq 0 ]; then
  log "training finished"
elif [ "$status" -eq 143 ]; then
  log "training stopped by SIGTERM after saving a checkpoint; submit the job again to resume it"
else
  log "training failed with status $status"
fi
exit "$status"
