"""Build DeepSpeed's CPU ops once, before anything runs in parallel.

On CPU, DeepSpeed JIT-compiles its shared-memory comm op when a process group
starts and its fused Adam when a config asks for Adam/AdamW; two ranks building
the same op at once collide. Building them here, in one process, makes every
later start a cache hit.
"""
from __future__ import annotations

import os
import time

import torch

CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")


def build_cpu_ops() -> dict[str, float]:
    """Seconds each op took to load (build on a cold cache, import on a warm one)."""
    if torch.cuda.is_available():
        return {}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    timings = {}
    for name in CPU_OPS:
        started = time.perf_counter()
        builder = get_accelerator().create_op_builder(name)
        if builder is not None:
            builder.load(verbose=False)
        timings[name] = time.perf_counter() - started
    return timings
