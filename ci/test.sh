#!/usr/bin/env bash
# Every test: the fast self-tests and the multi-rank matrices (CPU/gloo without GPUs).
# Extra arguments go to pytest, e.g. `bash ci/test.sh -m "not multigpu"`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh || exit 1
.venv/bin/python -m pytest -q --numerics-report reports/tests "$@"
status=$?
# pytest exits 5 when a selection collects no tests: that is a wrong filter, not a pass.
if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; fi
exit "$status"
