"""One cell through the persistent pool vs the same cell through a fresh spawn, in one run.

Prints seconds per cell for each and the ratio. Usage:
    .venv/bin/python benchmarks/pool_vs_spawn.py [--repeats 5] [--stage 2] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import statistics
import time

from numerics.launcher import RankPool
from numerics.spec import RunSpec


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def fresh_spawn(spec: RunSpec) -> None:
    with RankPool(spec.world_size) as pool:
        assert pool.run(spec).ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    spec = RunSpec(zero_stage=args.stage, dtype=args.dtype)
    with RankPool(spec.world_size) as pool:
        pool.start()
        pool.run(spec)  # warm-up: first DeepSpeed optimizer build in these ranks
        pooled = [timed(lambda: pool.run(spec)) for _ in range(args.repeats)]
    spawned = [timed(lambda: fresh_spawn(spec)) for _ in range(args.repeats)]
    p, s = statistics.median(pooled), statistics.median(spawned)
    print(f"cell {spec.cell_id}, {spec.steps} steps, {args.repeats} repeats (median)")
    print(f"  through the pool:   {p:6.2f} s/cell  (all: {', '.join(f'{x:.2f}' for x in pooled)})")
    print(f"  fresh spawn:        {s:6.2f} s/cell  (all: {', '.join(f'{x:.2f}' for x in spawned)})")
    print(f"  speed-up:           {s / p:6.1f}x")


if __name__ == "__main__":
    main()
