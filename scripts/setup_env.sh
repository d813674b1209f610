#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install segstudy into it.
# Sourced by run_all.sh and run_tests.sh; reinstalls only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEGSTUDY_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.segstudy-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing segstudy and its pinned dependencies into $VENV (first time: a few minutes)"
  start=$(date +%s)
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import segstudy, torch, torchvision" \
    || { echo "[setup] installation failed: see the pip output above" >&2; exit 1; }
  touch "$STAMP"
  echo "[setup] installed in $(( $(date +%s) - start )) s"
else
  echo "[setup] reusing $VENV (delete it, or touch pyproject.toml, to reinstall)"
fi
export PATH="$VENV/bin:$PATH"
