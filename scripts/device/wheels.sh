#!/usr/bin/env bash
# Developers: fills .whl/ with the x86-64 CPython 3.12 wheels that the GPU machine's image
# lacks (versions from requirements.lock; jax_triton 0.3.1, the one that runs under that
# image's triton 3.6; fla-core 0.6.0, flash-linear-attention's kernels for the benchmarks'
# FLA rows, pure Python on the image's torch and triton), and snapshots HEAD into .gpu/src.tar. Both folders are git-ignored
# here (.git/info/exclude) and travel to the machine with `carry: [".whl", ".gpu"]`; a
# command there starts with `source scripts/device/prelude.sh`. With --hf it also fills
# .whl_hf/ (transformers; see scripts/device/hf_site.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
for path in /.whl/ /.gpu/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
mkdir -p .whl .gpu
pinned() { grep -i "^$1==" requirements.lock; }
names=(ml_collections tensorflow-datasets tensorflow-metadata simple-parsing docstring_parser dm-tree
       immutabledict toml termcolor grain array_record flax orbax-checkpoint tensorboardX etils
       importlib_resources portpicker psutil
       pytest pluggy iniconfig hypothesis sortedcontainers attrs pytest-xdist execnet)
specs=("jax_triton==0.3.1" "fla-core==0.6.0")
for name in "${names[@]}"; do specs+=("$(pinned "$name")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
# promise ships only as an sdist; it is pure Python.
ls .whl/promise-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps -w .whl "$(pinned promise)"
if [ "${1:-}" = "--hf" ]; then  # transformers and friends for the HF fixtures (numpy: the image's)
  grep -qxF /.whl_hf/ .git/info/exclude || echo /.whl_hf/ >> .git/info/exclude
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl_hf transformers tokenizers safetensors
  # numpy: the image's; hf_xet and kernels: optional, and carry is capped at 64 MiB
  rm -f .whl_hf/numpy-* .whl_hf/hf_xet-* .whl_hf/kernels-*
fi
git archive HEAD -o .gpu/src.tar
du -sh .whl .gpu
