#!/usr/bin/env bash
# Set up the environment (if needed) and run the test suite: ./run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
ruff check lib tests
# one worker per logical CPU, at most 4 (each holds a torch and its own tiny dataset); -n 0 runs them in turn
python -m pytest -q -n logical --maxprocesses 4 "$@"
