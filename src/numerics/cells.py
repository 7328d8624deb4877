"""Which training loop runs a cell on a rank: the driver named by its RunSpec."""
from __future__ import annotations

from typing import Any

from numerics.spec import RunSpec
from numerics.trace import Trace


def run_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    if spec.driver == "trainer":
        from numerics.trainer_driver import run_trainer_cell

        return run_trainer_cell(spec, rank, meta)
    from numerics.train import run_engine_cell

    return run_engine_cell(spec, rank, meta)
