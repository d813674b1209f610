#!/usr/bin/env bash
# Install segstudy and its locked dependencies (requirements.lock) into a Python environment.
# Sourced by run_all.sh and run_tests.sh (and the Docker images); reinstalls only when
# pyproject.toml or requirements.lock changed.
#
# Which environment: $SEGSTUDY_VENV if set, else an active virtualenv ($VIRTUAL_ENV) or conda
# environment other than base ($CONDA_PREFIX), else .venv in the repository (created here).
# Which torch build: SEGSTUDY_TORCH=default (PyPI's wheel: CUDA 13 on Linux x86_64), cpu (no
# CUDA libraries: laptops, CPU CI runners, the serving image) or a CUDA tag such as cu126 / cu128 /
# cu130, taken from PyTorch's wheel index. The version is the lock's (torch==2.14.1) in every case.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${SEGSTUDY_VENV:-}" ]; then
  VENV="$SEGSTUDY_VENV"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  VENV="$VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-base}" != "base" ]; then
  VENV="$CONDA_PREFIX"
else
  VENV="$ROOT/.venv"
fi
TORCH_VARIANT="${SEGSTUDY_TORCH:-default}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
LOCK="$ROOT/requirements.lock"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.segstudy-installed"
pip_quiet() { "$VENV/bin/python" -m pip install -q -c "$LOCK" "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$LOCK" -nt "$STAMP" ] \
    || [ "$(cat "$STAMP")" != "$TORCH_VARIANT" ]; then
  echo "[setup] installing segstudy and its locked dependencies into $VENV, torch: $TORCH_VARIANT (first time: a few minutes)"
  start=$(date +%s)
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  if [ "$TORCH_VARIANT" != "default" ]; then
    pip_quiet --index-url "https://download.pytorch.org/whl/$TORCH_VARIANT" torch torchvision
  fi
  extras="${SEGSTUDY_EXTRAS-dev,lab}"  # the images set it empty: no test tools, no JupyterLab
  pip_quiet -e "$ROOT${extras:+[$extras]}"
  "$VENV/bin/python" -c "import segstudy, torch, torchvision" \
    || { echo "[setup] installation failed: see the pip output above" >&2; exit 1; }
  echo "$TORCH_VARIANT" > "$STAMP"
  echo "[setup] installed in $(( $(date +%s) - start )) s"
else
  echo "[setup] reusing $VENV (delete it, or touch pyproject.toml, to reinstall)"
fi
export PATH="$VENV/bin:$PATH"
