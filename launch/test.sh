#!/usr/bin/env bash
# Set up the environment (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
# No hub access during tests: pretrained weights come from files the tests save themselves.
export HF_HUB_OFFLINE=1
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure (a test suite that runs nothing checks nothing)" >&2
  exit 1
fi
exit "$status"
