#!/usr/bin/env bash
# Quick start, command 1: set up, then run the end-to-end demo on embedded backends.
# Extra arguments go to `codistill demo` (e.g. --size small).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
exec .venv/bin/codistill demo "$@"
