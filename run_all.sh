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
out=$(python -c 'import sys; from segstudy.config import load_config; print(load_config(sys.argv[1]).output_dir)' "$profile")
root=$(dirname "$out")
echo "[run_all] disk: $(du -sh "$root" | cut -f1) in $root ($(du -sh "$out" | cut -f1) in $out; the rest: data, MLflow)"
if [ -f "$out/report.html" ]; then
    echo "[run_all] report: $out/report.html (every notebook: $out/index.html)"
else
    echo "[run_all] no report yet: it is written when notebook 06 runs (./run_all.sh $profile --only 06)"
fi
