#!/usr/bin/env bash
# Regenerate the whole study: ./run_all.sh [profile] [--only 00 01 ...] [--set key=value ...] [--gpus N]
# Profiles live in params/ (smoke, demo, rehearsal, full, full-exhaustive); the default, demo, runs
# on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
profile=demo
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then profile="$1"; shift; fi
segstudy run --profile "$profile" "$@"  # prints the notebooks' seconds and the run's
# where this run wrote, --set output_root=... included
out=$(python - "$profile" "$@" <<'PY'
import sys
from segstudy.cli import build_parser
from segstudy.config_profiles import load_config, parse_overrides
args = build_parser().parse_args(["run", "--profile", *sys.argv[1:]])
print(load_config(args.profile, parse_overrides(args.set)).output_dir)
PY
)
root=$(dirname "$out")
echo "[run_all] outputs in $out; disk: $(du -sh "$root" | cut -f1) in $root ($(du -sh "$out" | cut -f1) in $out; the rest: data, MLflow)"
if [ -f "$out/report.html" ]; then
    echo "[run_all] report: $out/report.html (every notebook: $out/index.html)"
else
    echo "[run_all] no report yet: it is written when notebook 08 runs (./run_all.sh $profile --only 08)"
fi
