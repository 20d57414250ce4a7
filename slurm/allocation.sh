# Sourced by slurm/train.sh and slurm/extract.sh after they cd to the submit directory (sbatch runs a
# copy of the batch script from its spool folder, so siblings are found from there, not from $0).
# Needs: die(), MODULES, VENV, JOB_ID. Sets: NNODES, GPUS_PER_NODE, NUM_PROCESSES, HOSTS,
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
[[ "$gpus" =~ ^[0-9]+$ ]] && [ "$gpus" -ge 1 ] \
  || die "found no GPUs on the node (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}', nvidia-smi -L empty): request them with --gpus-per-node"
GPUS_PER_NODE="$gpus"
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))
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
