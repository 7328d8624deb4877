"""The spread between legitimate variants of a run: where the parity tolerances come from.

Runs clean cells that differ only in ways that must not change the numbers beyond rounding
(ZeRO stage, world size, GA split of the same global batch, communication dtype, client or
config optimizer: the reduction order changes, the maths does not) and measures each against
the plain-torch reference: per-step loss and grad norm, the step-0 gradient per parameter and
its scale, the engine's reported norm against ours, and at ZeRO-3 what each rank's slices of
the fp32 master moved by per step against the reference's same slices. Prints the largest spread per
tolerance class next to the tolerance (`thresholds.py`) and the headroom, so the tolerances
can be re-derived on new hardware or releases. Known deviations (xfail) are left out, as the
reasons say; a cell that fails is listed, not measured. Usage:
    .venv/bin/python benchmarks/spread.py [--cells GLOB] [--cover pairs|triples|full] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import fnmatch
import math
from collections import defaultdict

import numpy as np
from rich.console import Console
from rich.table import Table

from numerics.cell import matrix
from numerics.cell.spec import RunSpec
from numerics.judge.invariants import aligned, relative, step0_scale
from numerics.judge.thresholds import PRECISION_ORDER, tolerance
from numerics.run.runner import CellResult, PoolSet
from numerics.show.cli import add_cover

MEASURES = {  # measure -> the Tolerance field it bounds
    "loss": "loss_rtol", "grad norm": "grad_rtol", "step-0 gradient": "step0_grad_rtol",
    "step-0 scale": "step0_scale_rtol", "reported norm": "grad_norm_agree_rtol",
    "ZeRO-3 slice update": "partition_update_rtol",
}
FAMILIES = ("comm", "accum", "ws4", "default_buckets", "lora", "trainer")  # cells with a parity reference


def spread(result: CellResult) -> dict[str, float]:
    """The largest relative difference of each measure against the reference over the run."""
    trace, reference = result.outcome.trace, result.reference
    pairs = aligned(trace, reference)
    out = {"loss": max(relative(r.loss, e.loss) for r, e in pairs),
           "grad norm": max(relative(r.grad_norm, e.grad_norm) for r, e in pairs if r.grad_norm and e.grad_norm),
           "reported norm": max((relative(r.grad_norm_reported, r.grad_norm) for r, _ in pairs
                                 if r.grad_norm_reported is not None and r.grad_norm), default=float("nan"))}
    if any(r.partition_updates for r, _ in pairs):
        out["ZeRO-3 slice update"] = max(relative(math.hypot(*mine.values()), math.hypot(*theirs.values()))
                                         for r, e in pairs for mine, theirs in zip(r.partition_updates, e.partition_updates))
    if trace.step0_grads and reference.step0_grads and not trace.steps[0].skipped:
        out["step-0 gradient"] = max(float(np.linalg.norm(trace.step0_grads[n].reshape(-1) - g.reshape(-1)) /
                                           max(np.linalg.norm(g), 1e-30)) for n, g in reference.step0_grads.items())
        out["step-0 scale"] = abs(step0_scale(trace, reference) - 1.0)
    return out


def tolerance_class(spec: RunSpec) -> str:
    effective = max(spec.dtype, spec.comm_dtype or spec.dtype, spec.base_dtype, key=PRECISION_ORDER.index)
    return f"{'lora ' if spec.lora else ''}{effective}"


def selection(pattern: str | None, cover: str, seeds: list[int]) -> list[RunSpec]:
    families = [f for f in matrix.FAMILIES if f.name in FAMILIES]
    specs = {}
    for family in families:
        for axes in matrix.family_cells(family, cover):
            for seed in seeds:
                spec = RunSpec(**matrix.fixed_batch({**family.base, **axes, "seed": seed}))
                if pattern is None or fnmatch.fnmatch(spec.cell_id, pattern):
                    specs[spec.cell_id] = spec
    return list(specs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", metavar="GLOB")
    add_cover(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    console = Console(width=200)  # the table is wide; CI logs have no terminal to size it
    worst: dict[str, dict[str, tuple[float, str]]] = defaultdict(dict)
    counted: dict[str, int] = defaultdict(int)
    specs = selection(args.cells, args.cover, args.seeds)
    console.print(f"{len(specs)} cells")
    with PoolSet() as pools:
        for result in pools.run_all(specs):
            spec = result.spec
            if result.status != "pass":
                console.print(f"  {result.status:5s} {spec.cell_id} (not measured)")
                continue
            group = tolerance_class(spec)
            counted[group] += 1
            for measure, value in spread(result).items():
                if not worst[group].get(measure, (-1.0,))[0] >= value:
                    worst[group][measure] = (value, spec.cell_id)
    table = Table(title="Largest spread against the reference (clean cells), tolerance, headroom")
    for column in ("class", "cells", *MEASURES):
        table.add_column(column)
    for group in sorted(worst, key=lambda g: (g.startswith("lora"), PRECISION_ORDER.index(g.split()[-1]))):
        tol = tolerance(group.split()[-1], lora=group.startswith("lora"))
        cells = []
        for measure, field in MEASURES.items():
            value, _ = worst[group].get(measure, (float("nan"), ""))
            bound = getattr(tol, field)
            headroom = "" if not value > 0 else f" ({bound / value:.0f}x)" if bound / value < 1000 else " (>1000x)"
            cells.append(f"{value:.2g} / {bound:g}{headroom}")
        table.add_row(group, str(counted[group]), *cells)
    console.print(table)
    for group, measures in sorted(worst.items()):
        for measure, (value, cell) in measures.items():
            console.print(f"{group:10s} {measure:16s} {value:.3g}  at {cell}", highlight=False)


if __name__ == "__main__":
    main()
