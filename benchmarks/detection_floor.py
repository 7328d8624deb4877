"""Detection floor: the smallest uniform gradient error each kind of cell sees.

For each precision (fp32, bf16, fp16, LoRA fp16 and LoRA bf16) and ZeRO stage, the `grad_scale` fault
multiplies every reduced gradient by 1 + eps (with ``--fault clip_scale``, in the clip family's
cell, DeepSpeed clips at 1 + eps times the bound); this finds the smallest eps on a grid that
turns the cell red, by bisecting the grid (detection grows with eps), after checking that
the clean cell (no fault, several seeds) stays green. Real regressions of a few percent
exist: a normalisation per micro-batch instead of over the batch moves gradients by 3-5 %.

A cell counts as detecting eps when an invariant fails on it that does not fail on its clean
twin. The fault cell is judged as its clean twin is (known deviations apply): a deviation of the
clean cell excuses the fault cell's failure only while its signature holds, so a known deviation
by itself never counts as a detection, and an error on top of it does once it leaves the signature.

    .venv/bin/python benchmarks/detection_floor.py                  # 5 precisions x 4 stages (~6 min, 2 cores)
    .venv/bin/python benchmarks/detection_floor.py --stages 1 --seeds 0,1,2,3,4
    .venv/bin/python benchmarks/detection_floor.py --json floor.json
    .venv/bin/python benchmarks/detection_floor.py --fault clip_scale --precisions fp32,bf16,fp16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from numerics.cell.faults import ClipBoundScaled
from numerics.cell.invariant_sets import LORA_INVARIANTS
from numerics.cell.spec import RunSpec
from numerics.judge import deviations
from numerics.judge.invariants import step0_scale
from numerics.run.reference import reference_trace
from numerics.run.runner import CellResult, PoolSet

GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
PRECISIONS: dict[str, dict] = {  # name -> RunSpec fields
    "fp32": {},
    "bf16": {"dtype": "bf16"},
    "fp16": {"dtype": "fp16"},
    "lora fp16": {"dtype": "fp16", "lora": True, "invariants": LORA_INVARIANTS},
    "lora bf16": {"dtype": "bf16", "lora": True, "invariants": LORA_INVARIANTS},
}

# The faults with a strength, and the cell fields each runs in beside the precision's.
SCALED_FAULTS: dict[str, dict] = {"grad_scale": {}, "clip_scale": ClipBoundScaled.CELL}


@dataclass
class Floor:
    precision: str
    stage: int
    clean: list[str]  # the clean cell's status per seed
    clean_scale_error: float  # the largest |step-0 gradient scale - 1| of the clean cells: what the tolerance must clear
    eps: float | None  # smallest eps of the grid detected; None: not even the largest
    fired: list[str]  # what fired at that eps
    tried: dict[float, bool]


def failed(result: CellResult) -> set[str]:
    """Invariants that failed; a known deviation whose signature held (xfail) did not."""
    return {v.invariant for v in result.verdicts if v.failed}


def as_clean(result: CellResult) -> CellResult:
    """The fault cell's failures judged as its clean twin's: the fault stands for a library bug that
    no deviation's cell pattern can tell apart from the deviation itself. (Passes are left alone: a
    fault that happens to pass a strict deviation's invariant is no detection.)"""
    if result.outcome.trace is not None:
        deviations.apply([v for v in result.verdicts if v.status == "fail"], {**result.spec.to_dict(), "fault": None},
                         result.outcome.trace.meta["versions"])
    return result


def scale_error(result: CellResult) -> float:
    trace = result.outcome.trace
    return abs(step0_scale(trace, reference_trace(result.spec, trace)) - 1.0) if trace and trace.step0_grads else float("nan")


def find_floor(pools: PoolSet, fault: str, precision: str, stage: int, seeds: list[int], console: Console) -> Floor:
    base = RunSpec(**{**SCALED_FAULTS[fault], "zero_stage": stage, **PRECISIONS[precision]})
    cleans = [pools.run(base.with_(seed=seed)) for seed in seeds]
    baseline = set().union(*(failed(c) for c in cleans))  # only what the clean cells pass can detect
    tried: dict[float, bool] = {}
    fired: dict[float, list[str]] = {}
    low, high = 0, len(GRID) - 1  # search GRID[low..high] for the first detected eps
    while low <= high:
        middle = (low + high) // 2
        eps = GRID[middle]
        result = as_clean(pools.run(base.with_(fault=f"{fault}@{eps:g}")))
        fired[eps] = sorted(failed(result) - baseline)
        tried[eps] = bool(fired[eps])
        console.print(f"  {precision} ZeRO-{stage} eps {eps:g}: {', '.join(fired[eps]) or 'passes'}", highlight=False)
        if tried[eps]:
            high = middle - 1
        else:
            low = middle + 1
    floor = GRID[low] if low < len(GRID) else None
    return Floor(precision, stage, [c.status for c in cleans], max(scale_error(c) for c in cleans), floor,
                 fired.get(floor, []), tried)


def table(floors: list[Floor], fault: str) -> Table:
    out = Table(title=f"Detection floor: smallest {fault} error 1 + eps that fails the cell")
    for column in ("precision", "ZeRO", "clean cells", "clean |step-0 scale - 1|", "floor eps", "fired at the floor"):
        out.add_column(column)
    for floor in floors:
        clean = ", ".join(sorted(set(floor.clean)))
        out.add_row(floor.precision, str(floor.stage), clean if clean == "pass" else f"[red]{clean}[/]",
                    f"{floor.clean_scale_error:.2g}",
                    f"{floor.eps:g}" if floor.eps is not None else f"[red]> {GRID[-1]:g}[/]", ", ".join(floor.fired))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, of {list(PRECISIONS)}")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--seeds", default="0", help="seeds of the clean cells, which must all pass")
    parser.add_argument("--fault", default="grad_scale", choices=list(SCALED_FAULTS))
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    console, started, floors = Console(), time.monotonic(), []
    precisions = args.precisions.split(",")
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; known: {list(PRECISIONS)}")
    with PoolSet() as pools:
        for precision in precisions:
            for stage in map(int, args.stages.split(",")):
                floors.append(find_floor(pools, args.fault, precision, stage, [int(s) for s in args.seeds.split(",")], console))
    console.print(table(floors, args.fault))
    console.print(f"{time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([floor.__dict__ | {"tried": {f"{k:g}": v for k, v in floor.tried.items()}} for floor in floors], out, indent=1)
    return 0 if all(set(f.clean) <= {"pass", "xfail"} for f in floors) else 1


if __name__ == "__main__":
    sys.exit(main())
