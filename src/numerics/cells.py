"""Which training loop runs a cell on a rank: the driver named by its RunSpec."""
from __future__ import annotations

import time
from importlib import import_module
from typing import Any, Callable

import torch

from numerics.spec import RunSpec
from numerics.trace import Trace

# driver -> "module:function"; imported on first use so a rank loads only what it runs.
DRIVERS = {
    "engine": "numerics.train:run_engine_cell",
    "trainer": "numerics.trainer_driver:run_trainer_cell",
    "resume": "numerics.continuity:run_resume_cell",
    "epochs": "numerics.continuity:run_epochs_cell",
    "trainer_epochs": "numerics.trainer_driver:run_trainer_epochs_cell",
}


def torch_linear() -> Callable[..., torch.Tensor]:
    """``torch.nn.functional.linear`` as torch defines it, wherever ZeRO-3 put it aside."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    return getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", torch.nn.functional.linear)


def run_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """Run the cell's driver, then undo what DeepSpeed leaves in a persistent rank: ZeRO-3
    installs a memory-efficient ``torch.nn.functional.linear`` and never restores it, which
    changes the last bits of every later cell."""
    module, function = DRIVERS[spec.driver].split(":")
    started = time.perf_counter()
    try:
        trace = getattr(import_module(module), function)(spec, rank, meta)
    finally:
        torch.nn.functional.linear = torch_linear()
    wall_s = time.perf_counter() - started
    trace.meta.update(wall_s=wall_s, steps_per_s=len(trace.steps) / wall_s)
    return trace
