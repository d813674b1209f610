#!/usr/bin/env bash
# Install segstudy and its locked dependencies (requirements.lock) into a Python environment.
# Sourced by run_all.sh and run_tests.sh (and the Docker images); reinstalls only when
# pyproject.toml or requirements.lock changed.
#
# Which environment: $SEGSTUDY_VENV if set, else an active virtualenv ($VIRTUAL_ENV) or conda
# environment other than base ($CONDA_PREFIX), else .venv in the repository (created here).
# Which torch build: SEGSTUDY_TORCH=default (PyPI's wheel: CUDA 13.0 on Linux x86_64), cpu (no
# CUDA libraries: laptops, CPU CI runners, the serving image) or a CUDA tag that PyTorch publishes
# torch 2.14 for (cu126, cu130, cu132), taken from PyTorch's wheel index (SEGSTUDY_TORCH_INDEX_URL,
# default https://download.pytorch.org/whl). Unset: scripts/torch_variant.py chooses when it
# creates an environment (one [setup] line says which and why): with an NVIDIA GPU the newest build
# its driver runs; without one cpu if that index answers, else default. That environment keeps its
# build, through reinstalls too, until SEGSTUDY_TORCH asks for another (which replaces torch and
# torchvision). The version is the lock's (torch==2.14.1) in every case.
#
# How: the lock's entries the project and its extras need (scripts/lock_select.py), hash-checked
# (pip --require-hashes --no-deps); for a build other than default, torch and torchvision (and the
# CUDA libraries of a cuXXX build) then come from PyTorch's index, checked against the sha256 that
# index publishes, their other dependencies held at the lock's versions; then segstudy itself
# (editable, --no-deps) and `pip check`.
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
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
LOCK="$ROOT/requirements.lock"
TORCH_INDEX="${SEGSTUDY_TORCH_INDEX_URL:-https://download.pytorch.org/whl}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.segstudy-installed"  # the torch build installed (default, cpu, cu126, ...)
INSTALLED="$(cat "$STAMP" 2>/dev/null || true)"
# pip, its output less this machine's notes on missing local index folders; fails when pip fails
pip_quiet() {
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
if [ -z "$INSTALLED" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$LOCK" -nt "$STAMP" ] \
    || { [ -n "${SEGSTUDY_TORCH:-}" ] && [ "$INSTALLED" != "$SEGSTUDY_TORCH" ]; }; then
  TORCH_VARIANT="${SEGSTUDY_TORCH:-$INSTALLED}"  # unset: the build this environment already has
  if [ -z "$TORCH_VARIANT" ]; then
    TORCH_VARIANT="$("$VENV/bin/python" "$ROOT/scripts/torch_variant.py")" || TORCH_VARIANT=default
  fi
  echo "[setup] installing segstudy and its locked dependencies into $VENV, torch: $TORCH_VARIANT (first time: a few minutes)"
  start=$(date +%s)
  failed() { echo "[setup] installation failed ($1): see the pip output above" >&2; exit 1; }
  pip_quiet install -q --upgrade pip || failed "upgrading pip"
  if [ -n "$INSTALLED" ] && [ "$INSTALLED" != "$TORCH_VARIANT" ]; then
    # another build's torch: every build's metadata says 2.14.1 (or 2.14.1+<build>, which ==2.14.1
    # matches too), so pip would keep it as "already satisfied"
    pip_quiet uninstall -y -q torch torchvision || failed "removing the $INSTALLED build of torch"
  fi
  extras="${SEGSTUDY_EXTRAS-dev,lab,wandb}"  # the images set it empty: no test tools, no JupyterLab
  select=("$ROOT/scripts/lock_select.py" --lock "$LOCK" --pyproject "$ROOT/pyproject.toml" --extras "$extras")
  [ "$TORCH_VARIANT" = "default" ] || select+=(--without-torch)
  reqs="$(mktemp -d)"
  "$VENV/bin/python" "${select[@]}" > "$reqs/hashed.txt" || failed "reading requirements.lock"
  pip_quiet install -q --require-hashes --no-deps -r "$reqs/hashed.txt" || failed "the locked packages"
  if [ "$TORCH_VARIANT" != "default" ]; then
    "$VENV/bin/python" "${select[@]}" --constraints > "$reqs/constraints.txt" || failed "reading requirements.lock"
    pip_quiet install -q -c "$reqs/constraints.txt" --index-url "$TORCH_INDEX/$TORCH_VARIANT" \
      $(grep -oE '^(torch|torchvision)==[^ ;\\]+' "$LOCK") || failed "torch from $TORCH_INDEX/$TORCH_VARIANT"
  fi
  rm -rf "$reqs"
  pip_quiet install -q --no-deps -e "$ROOT" || failed "segstudy"
  # every package's requirements met? (cityscapesscripts still lists `typing`, a Python 2 backport
  # the lock leaves out; an active environment may hold other packages: a warning, not a failure)
  "$VENV/bin/python" -m pip check 2>&1 | grep -v -e "^No broken requirements" -e "requires typing, which is not installed" \
    | sed 's/^/[setup] warning: pip check: /' >&2 || true
  "$VENV/bin/python" -c "import segstudy, torch, torchvision" || failed "import"
  echo "$TORCH_VARIANT" > "$STAMP"
  echo "[setup] installed in $(( $(date +%s) - start )) s"
else
  echo "[setup] reusing $VENV, torch: $INSTALLED (delete it, or touch pyproject.toml, to reinstall)"
fi
export PATH="$VENV/bin:$PATH"
