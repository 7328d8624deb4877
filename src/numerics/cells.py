"""Which training loop runs a cell on a rank: the driver named by its RunSpec."""
from __future__ import annotations

from importlib import import_module
from typing import Any

from numerics.spec import RunSpec
from numerics.trace import Trace

# driver -> "module:function"; imported on first use so a rank loads only what it runs.
DRIVERS = {
    "engine": "numerics.train:run_engine_cell",
    "trainer": "numerics.trainer_driver:run_trainer_cell",
    "resume": "numerics.continuity:run_resume_cell",
    "epochs": "numerics.continuity:run_epochs_cell",
}


def run_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    module, function = DRIVERS[spec.driver].split(":")
    return getattr(import_module(module), function)(spec, rank, meta)
