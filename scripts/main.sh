#!/usr/bin/env bash
# The main job: set up, pretrain the small default model on the shipped corpus
# (tinyshakespeare, byte-level), then evaluate it on held-out text.
# Extra arguments go to train.py, e.g. --config.train.steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workdir="${WORKDIR:-runs/default}"
.venv/bin/python train.py --config configs/default.py --workdir "$workdir" "$@"
.venv/bin/python eval.py --workdir "$workdir"
