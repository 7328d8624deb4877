#!/usr/bin/env bash
# Creates .venv if missing and installs what Numerics needs, skipping what is already right.
# Order matters: torch first (a range would pull CUDA wheels), DeepSpeed without build
# isolation (its build would pull a CUDA torch), then the package itself. A torch or
# DeepSpeed already installed at another version than asked is replaced, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
PY="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
mkdir -p .venv/logs
# The report test opens report.html in headless Chromium: Debian's package, never a browser download
# at run time. apt works beside pip (~1 min on a fresh machine), waited for at the end.
browser=""
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing chromium (apt, in the background)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
        >.venv/logs/chromium.log 2>&1 &
    browser=$!
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
# The installed version of a package without its local label (2.13.0+cpu -> 2.13.0); empty if none.
installed() { "$VPY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]).split('+')[0])" "$1" 2>/dev/null || true; }
# Succeeds when $1 is installed at version $2, else says what will happen.
at_version() {
    local have
    have="$(installed "$1")"
    [ "$have" = "${2%%+*}" ] && return 0
    if [ -n "$have" ]; then
        echo "!!! $1 $have is installed but $1==$2 was asked: reinstalling $1==$2" >&2
    else
        echo "installing $1==$2"
    fi
    return 1
}

at_version torch "$TORCH_VERSION" || pip_install "torch==$TORCH_VERSION"
at_version deepspeed "$DEEPSPEED_VERSION" || DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
# DeepSpeed JIT-builds its CPU ops on first use; build them once here, before ranks start in parallel.
# The build needs only torch and DeepSpeed, so it runs while the rest installs (~2 min on 2 cores, cold).
PYTHONPATH=src "$VPY" -m numerics.run.prepare >.venv/logs/prepare.log 2>&1 &
prepare=$!
if ! "$VPY" -c "import numerics, pytest, peft, accelerate, uv, matplotlib" 2>/dev/null || [ ! -x .venv/bin/actionlint ]; then
    echo "installing numerics[test]"
    pip_install -e ".[test]"
fi
if ! wait "$prepare"; then
    cat .venv/logs/prepare.log >&2
    echo "building DeepSpeed's CPU ops failed (above)" >&2
    exit 1
fi
grep "ready in" .venv/logs/prepare.log
if [ -n "$browser" ] && ! wait "$browser"; then
    cat .venv/logs/chromium.log >&2
    echo "installing chromium failed (above)" >&2
    exit 1
fi
