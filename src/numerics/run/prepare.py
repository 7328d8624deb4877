"""Build DeepSpeed's CPU ops once, before anything runs in parallel.

On CPU, DeepSpeed JIT-compiles its shared-memory comm op when a process group
starts and its fused Adam when a config asks for Adam/AdamW; two ranks building
the same op at once collide. Every rank loads both here, each op under a file lock,
before it joins the process group: on a cold cache the first builds and the others
load what it built. `numerics prepare` (set-up) does it once ahead, so no run waits.

A build killed midway (a cell's timeout, a Ctrl-C, a lost machine) leaves torch's
``lock`` file in the op's build directory, and every later load waits on it forever.
Builds here hold an OS lock beside that directory (released by the kernel when the
holder dies), so a torch ``lock`` found while holding it was left by a dead build and
is removed. A DeepSpeed job outside Numerics building the same op at that moment
would lose its lock; Numerics' own ranks only load what was built here.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")


def build_cpu_ops() -> dict[str, float]:
    """Seconds each op took to load (build on a cold cache, import on a warm one). One after the
    other: ninja already compiles an op's sources in parallel, and side by side the two cold
    builds took 145 s on 2 cores against 103 s in turn."""
    if torch.cuda.is_available():
        return {}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    own_extensions_dir()
    remember_cpu_info()
    return {name: load_cpu_op(name) for name in CPU_OPS}


def main() -> int:
    """``numerics prepare``; also ``python -m numerics.run.prepare`` with ``src`` on the path, which
    needs only torch and DeepSpeed: ci/setup.sh builds the ops while the rest installs."""
    for name, seconds in build_cpu_ops().items():
        print(f"{name}: ready in {seconds:.1f}s", flush=True)
    return 0


def own_extensions_dir() -> str | None:
    """Keep this virtual environment's JIT-built ops in it: ``TORCH_EXTENSIONS_DIR`` defaults to
    ``<venv>/torch_extensions`` (a value already set, e.g. a version overlay's, is kept).

    torch's default, ``~/.cache/torch_extensions``, is shared by every venv of the user, and an op
    built from another checkout's DeepSpeed sources (another path) is rebuilt on load: a fresh
    clone's CI here made the next test session in the main checkout rebuild both ops (~3 min).
    Outside a venv (``sys.prefix`` is the base Python's, often not writable) torch's default stays.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def remember_cpu_info() -> None:
    """Answer py-cpuinfo's ``get_cpu_info`` from a file kept beside the ops.

    DeepSpeed's CPU op builders ask it for the processor's architecture and SIMD flags (to pick
    compiler flags) twice per op load, and each call starts a Python subprocess: 2.4 s per rank at
    every pool start here, under the build lock, so 4.8 s of a 2-rank pool's 7.7 s start. The
    answer depends only on the processor, so it is computed once per processor (the file is named
    by its model and flags) and read back after that.
    """
    import cpuinfo
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # where torch puts the ops
    path = Path(root) / f"cpuinfo-{processor_key()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = cpuinfo.get_cpu_info()
        staged = path.with_suffix(f".{os.getpid()}")
        staged.write_text(json.dumps(info))
        staged.replace(path)  # atomic: a concurrent reader sees all of it or nothing
    cpuinfo.get_cpu_info = lambda: dict(info)


def processor_key() -> str:
    """A short name for this processor: its model and feature flags (or platform's description)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        identity = "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        identity = platform.processor() + platform.machine()
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def load_cpu_op(name: str) -> float:
    from deepspeed.accelerator import get_accelerator

    started = time.perf_counter()
    builder = get_accelerator().create_op_builder(name)
    if builder is not None:
        without_debug_info(builder)
        with sole_builder(builder.name):
            builder.load(verbose=False)
    return time.perf_counter() - started


def without_debug_info(builder: object) -> None:
    """Compile the op without DeepSpeed's ``-g``: GCC emits the same code with or without debug
    information (cpu_adam_impl.o of deepspeed 0.19.8 disassembles identically), which took a third
    of the fused Adam's cold build here (that file: 38 s with it, 26 s without, on 2 cores), in
    set-up and in each release environment (deepspeed 0.15.4's: 133 s -> 103 s). Every Numerics process loads the ops here first (ranks at start,
    ``numerics prepare``), so DeepSpeed's own later loads find them loaded (``_loaded_ops``); a
    DeepSpeed job outside Numerics sharing this extensions directory would rebuild with its flags."""
    flags = builder.cxx_args
    builder.cxx_args = lambda: [flag for flag in flags() if flag != "-g"]


@contextmanager
def sole_builder(op: str) -> Iterator[None]:
    """Hold the OS lock for ``op``'s build directory; clear a dead build's torch lock."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(op, verbose=False))
    with open(build_dir.parent / f".{op}.numerics-lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            print(f"removing {stale}: left by a build that did not finish", flush=True)
            stale.unlink()
        yield


if __name__ == "__main__":
    raise SystemExit(main())
