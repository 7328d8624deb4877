"""Which training loop runs a cell on a rank: the driver named by its RunSpec."""
from __future__ import annotations

import time
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

import torch

from numerics.cell.spec import RunSpec
from numerics.judge.trace import Trace

# driver -> "module:function"; imported on first use so a rank loads only what it runs.
DRIVERS = {
    "engine": "numerics.run.train:run_engine_cell",
    "trainer": "numerics.run.trainer_driver:run_trainer_cell",
    "resume": "numerics.run.continuity:run_resume_cell",
    "epochs": "numerics.run.continuity:run_epochs_cell",
    "trainer_epochs": "numerics.run.trainer_driver:run_trainer_epochs_cell",
}


def torch_linear() -> Callable[..., torch.Tensor]:
    """``torch.nn.functional.linear`` as torch defines it, wherever ZeRO-3 put it aside."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    return getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", torch.nn.functional.linear)


def reset_peak_rss() -> None:
    """Restart this process's peak resident memory (VmHWM) from its current size, so the peak
    read after a cell is that cell's, not the largest cell this persistent rank ever ran.
    Linux only; where it is refused, the peak read after spans the process's life, a bound
    still."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float | None:
    """This process's peak resident memory in MiB since the last reset (VmHWM), or None off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if kib is None else int(kib) / 1024


def require_bf16_on_gpu(spec: RunSpec, meta: dict[str, Any]) -> None:
    """A bf16 cell on a GPU without bf16 (before Ampere) cannot run: say so, as a release
    lacking an API does, instead of failing it. fp16 needs no such check on a GPU, and on CPU
    torch computes bf16 everywhere."""
    from numerics.versions.compat import Unsupported

    if meta.get("backend") == "nccl" and "bf16" in (spec.dtype, spec.comm_dtype, spec.base_dtype) \
            and not torch.cuda.is_bf16_supported():
        raise Unsupported(f"{torch.cuda.get_device_name()} has no bf16: the cell needs it (dtype, comm or base dtype)")


def run_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """Run the cell's driver, then undo what DeepSpeed leaves in a persistent rank: ZeRO-3
    installs a memory-efficient ``torch.nn.functional.linear`` and never restores it, which
    changes the last bits of every later cell. Records the rank's peak resident memory over
    the cell (``meta["peak_rss_mib"]``)."""
    require_bf16_on_gpu(spec, meta)
    module, function = DRIVERS[spec.driver].split(":")
    reset_peak_rss()
    started = time.perf_counter()
    try:
        trace = getattr(import_module(module), function)(spec, rank, meta)
    finally:
        torch.nn.functional.linear = torch_linear()
    wall_s = time.perf_counter() - started
    trace.meta.update(wall_s=wall_s, steps_per_s=len(trace.steps) / wall_s, peak_rss_mib=peak_rss_mib())
    return trace
