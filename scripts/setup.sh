#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs sparseformer with its pinned dependencies
# (requirements.lock). Safe to run again: it reinstalls only when pyproject.toml or the
# lock file changed. Set PYTHON=/path/to/python3.12 to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local candidate version
  for candidate in "${PYTHON:-}" python3.12 python3.13 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      command -v "$candidate"; return 0
    fi
  done
  # pyenv keeps interpreters whose shims only work with PYENV_VERSION set.
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.|$)' | sort -V); do
      candidate="$(pyenv root)/versions/$version/bin/python3"
      if [ -x "$candidate" ] && python_ok "$candidate"; then echo "$candidate"; return 0; fi
    done
  fi
  return 1
}

stamp_of_inputs() { cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1; }

if [ ! -x .venv/bin/python ] || ! python_ok .venv/bin/python; then
  python="$(find_python)" || { echo "error: sparseformer needs Python >= 3.12 (python3.12 not found)" >&2; exit 2; }
  echo "setup: creating .venv with $python ($("$python" --version))"
  rm -rf .venv
  "$python" -m venv .venv
fi

stamp="$(stamp_of_inputs)"
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing pinned dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c requirements.lock -e '.[dev]'
  echo "$stamp" > .venv/.installed
fi
