"""Measured cost of every cell and test, for balancing shards (`numerics.show.shard`).

Reads the ``results.json`` of one or more runs (``numerics run --full --report DIR``,
``pytest --numerics-report DIR``) and writes ``src/numerics/show/costs.json``: each cell's wall
seconds in the pool and each test's seconds. Prints how well the measured costs split into
``--shards`` (the largest shard over the mean). Usage:
    .venv/bin/python benchmarks/cell_costs.py reports/full reports/tests [--shards 4]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from numerics.show import results, shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="report directories holding results.json")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--out", type=Path, default=shard.COSTS_FILE)
    args = parser.parse_args()
    costs: dict[str, dict[str, float]] = {"cells": {}, "tests": {}}
    for directory in args.reports:
        data = results.load(directory)
        costs["cells"].update({c["cell"]: round(c["wall_s"], 2) for c in data["cells"]})
        costs["tests"].update({k: round(v, 2) for k, v in data.get("tests", {}).items()})
    args.out.write_text(json.dumps({kind: dict(sorted(v.items())) for kind, v in costs.items()}, indent=0) + "\n")
    print(f"wrote {args.out}: {len(costs['cells'])} cells, {len(costs['tests'])} tests")
    for kind, measured in costs.items():
        if measured:
            loads = [sum(measured[i] for i in part) for part in shard.assign(measured, measured, args.shards)]
            print(f"{kind}: {sum(loads):.0f} s in {args.shards} shards of {', '.join(f'{x:.0f}' for x in loads)} s "
                  f"(largest / mean = {max(loads) / (sum(loads) / len(loads)):.3f})")


if __name__ == "__main__":
    main()
