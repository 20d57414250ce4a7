# Sourced by slurm/train.sh and slurm/extract.sh after they cd to the submit directory (sbatch runs a
# copy of the batch script from its spool folder, so siblings are found from there, not from $0).
# Needs: die(), MODULES, VENV, JOB_ID, DEVICE, PROCESSES_PER_NODE, ACCELERATE_CONFIG. Sets: DEVICE (gpu or
# cpu), NNODES, GPUS_PER_NODE, PROCESSES_PER_NODE, NUM_PROCESSES, ACCELERATE_CONFIG (when empty), HOSTS,
# MASTER_ADDR, MASTER_PORT; loads modules and activates the venv.
if [ -n "$MODULES" ]; then
  command -v module >/dev/null 2>&1 || die "MODULES='$MODULES' is set but the \`module\` command is not available"
  # shellcheck disable=SC2086  # a space-separated list of module names
  module load $MODULES
fi
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
command -v accelerate >/dev/null 2>&1 || die "\`accelerate\` is not on PATH: set VENV to the jaguar virtual environment"

# ------------------------------------------------------------------ the allocation
NNODES="${SLURM_NNODES:-1}"
gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
gpus="${gpus##*:}"  # SLURM_GPUS_PER_NODE may read "a100:4"
if [ -z "$gpus" ]; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
[[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
case "$DEVICE" in
  auto) if [ "$gpus" -ge 1 ]; then DEVICE=gpu; else DEVICE=cpu; fi ;;
  gpu) [ "$gpus" -ge 1 ] \
    || die "DEVICE=gpu but found no GPUs on the node (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}', nvidia-smi -L empty): request them with sbatch --gpus-per-node=N, or use DEVICE=cpu" ;;
  cpu) ;;
  *) die "DEVICE='$DEVICE' is not one of auto, gpu, cpu" ;;
esac
GPUS_PER_NODE="$gpus"
if [ "$DEVICE" = cpu ]; then
  GPUS_PER_NODE=0
  # Hidden from every process, so DDP and DeepSpeed alike run on the CPU with gloo (the trainer
  # picks gloo when torch sees no GPU); a no-op on a node without GPUs.
  export CUDA_VISIBLE_DEVICES=""
fi
# One process per GPU; on CPU one process per node by default, using every core it was given
# (several small processes rarely beat one with many threads).
if [ -z "$PROCESSES_PER_NODE" ]; then
  if [ "$DEVICE" = gpu ]; then PROCESSES_PER_NODE="$GPUS_PER_NODE"; else PROCESSES_PER_NODE=1; fi
fi
[[ "$PROCESSES_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "PROCESSES_PER_NODE='$PROCESSES_PER_NODE' is not a positive integer"
NUM_PROCESSES=$((NNODES * PROCESSES_PER_NODE))
if [ "$DEVICE" = cpu ] && [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  # torchrun would otherwise set 1 thread per process when it starts several.
  threads=$((SLURM_CPUS_PER_TASK / PROCESSES_PER_NODE))
  export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

if [ -z "$ACCELERATE_CONFIG" ]; then
  if [ "$NNODES" -gt 1 ]; then
    ACCELERATE_CONFIG=launch/multi_node.yaml      # the precision comes from the recipe, so CPU too
  elif [ "$DEVICE" = cpu ]; then
    ACCELERATE_CONFIG=launch/cpu_2proc.yaml       # DDP over gloo; --num_processes below wins
  elif [ "$NUM_PROCESSES" -gt 1 ]; then
    ACCELERATE_CONFIG=launch/multi_gpu.yaml
  else
    ACCELERATE_CONFIG=launch/single_gpu.yaml
  fi
fi
[ -f "$ACCELERATE_CONFIG" ] || die "ACCELERATE_CONFIG '$ACCELERATE_CONFIG' not found in $PWD (see launch/README.md)"

# Read every host (not `| head -n 1`: under pipefail scontrol's SIGPIPE would end the job).
mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}")
MASTER_ADDR="${HOSTS[0]:-}"
[ -n "$MASTER_ADDR" ] || die "could not read the first host of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
# Derived from the job id so that every node computes the same port, and two jobs sharing a
# node rarely collide; kept in the unprivileged, non-ephemeral range.
MASTER_PORT=$((10000 + JOB_ID % 20000))

# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: without this each task
# (and all its data-loading workers) would be pinned to a single core.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi
