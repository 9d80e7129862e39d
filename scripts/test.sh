#!/usr/bin/env bash
# Set up, then run the default test suite (CPU; slow and hardware tests are left out).
# Extra arguments go to pytest, e.g. -m slow, or -m gpu on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 --dist worksteal "$@"
