"""Flakes and determinism: the same selection run N times, each in fresh pools.

Every run must give every cell the same verdicts, and every fp32 cell the same trace bit for
bit (loss, grad norms, every rank's parameter checksum, per step). Prints the counts and each
cell that differed. Usage:
    .venv/bin/python benchmarks/determinism.py [--runs 5] [--cells GLOB] [--cover pairs|triples|full]
"""
from __future__ import annotations

import argparse
import time

from numerics.cell import matrix
from numerics.show.cli import add_cover
from numerics.run.runner import CellResult, PoolSet


def fingerprint(result: CellResult) -> list[tuple]:
    trace = result.outcome.trace
    return [] if trace is None else [(s.loss, s.grad_norm, s.grad_norm_reported, tuple(s.param_checksums))
                                     for s in trace.steps]


def verdicts(result: CellResult) -> list[tuple[str, str]]:
    return [(v.invariant, v.status) for v in result.verdicts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cells", metavar="GLOB")
    add_cover(parser)
    args = parser.parse_args()
    specs = matrix.cells(args.cover, pattern=args.cells)
    runs = []
    for number in range(1, args.runs + 1):  # compared after every run, so a stopped benchmark still tells
        started = time.perf_counter()
        with PoolSet() as pools:
            runs.append({r.spec.cell_id: r for r in pools.run_all(specs)})
        print(f"run {number}/{args.runs}: {len(specs)} cells in {time.perf_counter() - started:.0f} s", flush=True)
        compare(runs)


def compare(runs: list[dict[str, CellResult]]) -> None:
    first = runs[0]
    verdict_flakes = sorted(c for c in first if any(verdicts(run[c]) != verdicts(first[c]) for run in runs[1:]))
    fp32 = [c for c in first if first[c].spec.dtype == "fp32" and first[c].spec.comm_dtype in (None, "fp32")]
    moved = sorted(c for c in fp32 if any(fingerprint(run[c]) != fingerprint(first[c]) for run in runs[1:]))
    print(f"{len(first)} cells x {len(runs)} runs: {len(verdict_flakes)} with differing verdicts; "
          f"{len(fp32)} fp32 cells, {len(moved)} whose traces differ bit-wise", flush=True)
    for cell in verdict_flakes:
        print(f"  verdicts differ: {cell}: " + " | ".join(str(verdicts(run[cell])) for run in runs))
    for cell in moved:
        print(f"  fp32 trace differs: {cell}")


if __name__ == "__main__":
    main()
