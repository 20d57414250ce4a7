#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and install jaguar with its test and export extras.
# Idempotent: skips the install when pyproject.toml has not changed since the last one.
# Usage: source it or run it; JAGUAR_VENV overrides the venv location (default: ./.venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAGUAR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.jaguar-installed"
# The stamp names the clone too: the install is editable, so a venv shared by two clones runs the code
# of the clone that installed it last; using it from another clone re-points it there (and says so).
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $ROOT"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing jaguar from $ROOT (editable) and its dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,export]"
  echo "$WANT" > "$STAMP"
fi
# DeepSpeed JIT-compiles ops on first use (2-3 minutes on 2 cores): one persistent cache for the tests,
# the demo and every shell that activates the venv, so an op the tests built is not built again.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
if ! grep -q "TORCH_EXTENSIONS_DIR" "$VENV/bin/activate"; then
  printf '\n# added by jaguar launch/setup.sh: DeepSpeed ops built once, kept across shells\nexport TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"\n' >> "$VENV/bin/activate"
fi
export PATH="$VENV/bin:$PATH"
if [ "$(cat "$STAMP.announced" 2>/dev/null || true)" != "$WANT" ]; then  # once, after the first install
  echo "[setup] done; in a new shell, \`source $VENV/bin/activate\` puts jaguar and tensorboard on the PATH"
  echo "$WANT" > "$STAMP.announced"
fi
