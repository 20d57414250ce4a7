#!/usr/bin/env bash
# The GPU check, one command: versions; EVA-02-L/448 training steps through the real Trainer (bf16,
# gradient checkpointing on/off, micro-batch 8/16: s/step, images/s, peak memory, MFU); a DeepSpeed
# ZeRO-2 step via accelerate launch; `jaguar extract` throughput at 448 px with flip TTA; re-ranking's
# torch path on the GPU against the CPU; local matching (DISK + LightGlue on the GPU, RootSIFT on the
# CPU). Prints a table, writes OUT/gpu_check.json (under 8 minutes on one GPU). Without a GPU it says
# so and exits 0 at once.
#
#   bash benchmarks/gpu_check.sh OUT [benchmarks/gpu_check.py options, e.g. --skip deepspeed]
#
# Uses $VENV (default: the clone's .venv) when it exists; runs from the repository root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: bash benchmarks/gpu_check.sh OUT [options]: OUT is the folder for gpu_check.json}"
shift
mkdir -p "$OUT"
# Checked before Python starts: importing torch alone takes seconds.
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  reason="no NVIDIA GPU on $(hostname) (nvidia-smi lists none)"
  echo "gpu_check: no GPU: $reason; nothing measured"
  printf '{\n "cuda": false,\n "reason": "%s"\n}\n' "$reason" > "$OUT/gpu_check.json"
  exit 0
fi
VENV="${VENV:-$ROOT/.venv}"
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
cd "$ROOT"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # random init: no weights are downloaded
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
exec python benchmarks/gpu_check.py "$OUT" "$@"
