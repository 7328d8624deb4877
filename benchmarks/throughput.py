"""Cells per minute three ways, and where a cell's time goes, in one run.

The same cells of the default matrix run (1) through one persistent pool, (2) with a fresh
spawn per cell: new interpreters (what a harness without a pool pays, torchrun or mp.spawn per
test), and new forks of the pool's preloaded server (what a pool rebuilt after a failed cell
pays), and (3) as pytest tests, serially and with ``-n 2`` pytest-xdist workers.
For the pool it splits each cell's wall time, per ZeRO stage, into building the engine,
its training steps, the rest on the rank (reference-free checks, teardown), hand-off
between processes, and the parent's verdicts (reference run included). Usage:
    .venv/bin/python benchmarks/throughput.py [--cells 12] [--spawned 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from numerics.cell import matrix
from numerics.cell.spec import RunSpec
from numerics.run.launcher import RankPool
from numerics.run.runner import PoolSet

PARTS = ("build", "steps", "rest on rank", "hand-off", "verdicts")


def sample(count: int) -> list[RunSpec]:
    """``count`` two-rank engine cells of the default matrix, spread evenly over it (all stages)."""
    specs = [s for s in matrix.cells() if s.world_size == 2 and s.driver == "engine" and not s.lora]
    return specs[:: max(1, len(specs) // count)][:count]


def per_minute(cells: int, seconds: float) -> str:
    return f"{60 * cells / seconds:6.1f} cells/min ({seconds:.1f} s for {cells})"


def through_pool(specs: list[RunSpec]) -> tuple[float, dict[int, dict[str, list[float]]]]:
    parts: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with PoolSet() as pools:
        pools.run(specs[0])  # start the ranks and warm them: what a session pays once
        started = time.perf_counter()
        for spec in specs:
            begun = time.perf_counter()
            result = pools.run(spec)
            total = time.perf_counter() - begun
            meta = result.outcome.trace.meta
            shares = {"build": meta["build_s"], "steps": meta["steps_s"],
                      "rest on rank": meta["wall_s"] - meta["build_s"] - meta["steps_s"],
                      "hand-off": result.outcome.wall_s - meta["wall_s"], "verdicts": total - result.outcome.wall_s}
            for name, seconds in shares.items():
                parts[spec.zero_stage][name].append(seconds)
        return time.perf_counter() - started, parts


def fresh_spawns(specs: list[RunSpec], interpreters: bool) -> float:
    started = time.perf_counter()
    for spec in specs:
        with RankPool(spec.world_size, fresh=interpreters) as pool:
            assert pool.run(spec).ok
    return time.perf_counter() - started


def under_pytest(specs: list[RunSpec], workers: int) -> float:
    ids = [f"tests/test_matrix.py::test_cell[{spec.cell_id}]" for spec in specs]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers), *ids],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=12, help="cells for the pool and pytest runs")
    parser.add_argument("--spawned", type=int, default=3, help="cells for the fresh-spawn run (slow)")
    args = parser.parse_args()
    specs = sample(args.cells)
    pooled, parts = through_pool(specs)
    print(f"{len(specs)} cells: {', '.join(s.cell_id for s in specs)}")
    print(f"pool (warm):          {per_minute(len(specs), pooled)}")
    for interpreters, what in ((True, "new interpreters"), (False, "forks of the server")):
        spawned = fresh_spawns(specs[: args.spawned], interpreters)
        print(f"fresh spawn per cell, {what}: {per_minute(args.spawned, spawned)}, "
              f"the pool {(spawned / args.spawned) / (pooled / len(specs)):.1f}x faster")
    for workers in (0, 2):
        print(f"pytest -n {workers}:          {per_minute(len(specs), under_pytest(specs, workers))} (pool start included)")
    print("\nwhere a pooled cell's time goes (median seconds, share of the cell)")
    print(f"{'stage':>5}  " + "  ".join(f"{name:>15}" for name in PARTS))
    for stage, shares in sorted(parts.items()):
        medians = {name: statistics.median(shares[name]) for name in PARTS}
        whole = sum(medians.values())
        print(f"{stage:>5}  " + "  ".join(f"{medians[n]:7.3f} ({medians[n] / whole:4.0%})" for n in PARTS))


if __name__ == "__main__":
    main()
