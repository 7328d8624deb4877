#!/usr/bin/env bash
# The main job: the default matrix through `numerics run`, a results table, and
# reports/latest/{results.json,junit.xml,report.html}. Extra arguments go to `numerics run`.
# Without GPUs it runs as two jobs at once (`--jobs 2`: one rank pool keeps 2 cores ~72 % busy,
# a second fills the rest); with GPUs as one, since every job's pools would take the same devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
jobs=2
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then jobs=1; fi
exec .venv/bin/numerics run --jobs "$jobs" --report reports/latest "$@"
