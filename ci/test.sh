#!/usr/bin/env bash
# Every test: the fast self-tests and the multi-rank matrices (CPU/gloo without GPUs).
# Extra arguments go to pytest, e.g. `bash ci/test.sh -m "not multigpu"`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh || exit 1
# The matrix test at cover "pairs" (107 cells): the tests prove the suite works in ~14 minutes; the
# default matrix (cover "triples", 193 cells) is the main job, bash ci/matrix.sh. A later
# --numerics-cover or --numerics-full in "$@" wins.
.venv/bin/python -m pytest -q --numerics-report reports/tests --numerics-cover pairs "$@"
status=$?
# pytest exits 5 when a selection collects no tests: that is a wrong filter, not a pass.
if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; fi
exit "$status"
