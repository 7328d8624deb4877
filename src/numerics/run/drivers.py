"""Which training loop runs a cell on a rank: the driver named by its RunSpec."""
from __future__ import annotations

import gc
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


def zero3_stack_depth() -> int:
    """How many modules ZeRO-3's forward module stack holds now (see `release_zero3_leftovers`)."""
    from deepspeed.runtime.zero import parameter_offload

    return len(getattr(parameter_offload, "FWD_MODULE_STACK", []))


def release_zero3_leftovers(stack_depth: int) -> None:
    """Drop what ZeRO-3 keeps of finished engines in module globals, for a persistent rank's life:
    each model on the forward module stack (``parameter_offload.FWD_MODULE_STACK``: every engine
    pushes its model there and nothing pops it, not even ``engine.destroy()``), and each parameter
    coordinator with its modules in the unbounded ``lru_cache`` of its ``__params_to_release``.
    Every ZeRO-3 cell left ~5,000 objects (LoRA and epochs cells 20,000-40,000) that the collector
    scanned at each ``gc.collect()`` DeepSpeed makes while building an engine: 0.1 s a build after
    16 cells. Names a release lacks are skipped."""
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    del getattr(parameter_offload, "FWD_MODULE_STACK", [])[stack_depth:]
    coordinator = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None)
    method = getattr(coordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    # the cache sits under DeepSpeed's nvtx decorator, in its closure (no __wrapped__)
    for candidate in (method, *(cell.cell_contents for cell in getattr(method, "__closure__", None) or ())):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


def freeze_survivors() -> None:
    """Collect what earlier cells left, then exempt what survives from every later collection:
    what is alive between cells lives as long as the rank (modules, the process group, imports a
    cell made on first use, DeepSpeed's caches). DeepSpeed calls ``gc.collect()`` at every ZeRO-3
    build and the Trainer at every start (accelerate's ``free_memory``): scanning all that took
    0.7 s of a 3.9 s Trainer cell, and 0.05 s of a ZeRO-3 build after a LoRA cell's imports."""
    gc.collect()
    gc.freeze()


def modules_left() -> int:
    """How many torch modules the cell just run left alive. With the collector frozen at the
    cell's start (`freeze_survivors`), every module it still tracks was made by this cell; a
    persistent rank would carry them into every cell after it."""
    gc.collect()
    return sum(isinstance(obj, torch.nn.Module) for obj in gc.get_objects())


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
    changes the last bits of every later cell, and keeps the cell's model in module globals
    (`release_zero3_leftovers`). Starts from a collector with nothing old to scan
    (`freeze_survivors`). Records the rank's peak resident memory over
    the cell (``meta["peak_rss_mib"]``)."""
    require_bf16_on_gpu(spec, meta)
    module, function = DRIVERS[spec.driver].split(":")
    freeze_survivors()
    reset_peak_rss()
    stack_depth = zero3_stack_depth()
    started = time.perf_counter()
    try:
        trace = getattr(import_module(module), function)(spec, rank, meta)
    finally:
        torch.nn.functional.linear = torch_linear()
        release_zero3_leftovers(stack_depth)
    wall_s = time.perf_counter() - started
    trace.meta.update(wall_s=wall_s, steps_per_s=len(trace.steps) / wall_s, peak_rss_mib=peak_rss_mib(),
                      modules_left=modules_left())
    return trace
