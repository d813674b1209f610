#!/usr/bin/env bash
# Set up the environment (if needed) and run the test suite: ./run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
ruff check lib tests
python -m pytest -q "$@"
