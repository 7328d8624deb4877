#!/usr/bin/env bash
# The main job: the default matrix through `numerics run`, a results table, and
# reports/latest/{results.json,junit.xml}. Extra arguments go to `numerics run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
exec .venv/bin/numerics run --report reports/latest "$@"
