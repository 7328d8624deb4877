#!/usr/bin/env bash
# Every test: the fast self-tests and the multi-rank matrices (CPU/gloo without GPUs).
# Extra arguments go to pytest, e.g. `bash ci/test.sh -m "not multigpu"`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh || exit 1
# The matrix test at cover "pairs" (107 cells): the tests prove the suite works; the default
# matrix (cover "triples", 193 cells) is the main job, bash ci/matrix.sh. Two xdist workers: on 2
# cores the session takes ~385 s instead of ~520 s (the hang timeouts, subprocess starts and
# release builds of one worker overlap the other's training). A later -n, --numerics-cover or
# --numerics-full in "$@" wins.
.venv/bin/python -m pytest -q -n 2 --numerics-report reports/tests --numerics-cover pairs "$@"
status=$?
# pytest exits 5 when a selection collects no tests: that is a wrong filter, not a pass.
if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; fi
exit "$status"
