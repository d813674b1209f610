#!/usr/bin/env bash
# Regenerate the whole study: ./run_all.sh [profile] [--only 00 01 ...] [--set key=value ...]
# Profiles live in params/ (smoke, demo, full); the default, demo, runs on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
profile="${1:-demo}"
[ $# -gt 0 ] && shift
start=$(date +%s)
segstudy run "$profile" "$@"
echo "[run_all] profile $profile finished in $(( $(date +%s) - start )) s; outputs in outputs/$profile/"
