"""Shards: a deterministic, cost-balanced slice of a selection, so N runners split one matrix.

Every runner computes the same assignment from the same inputs: items sorted by
measured cost (longest first, ties by name) go one by one to the least-loaded
shard (LPT scheduling, within 4/3 of the best split). Costs are seconds measured
on a real run (``costs.json``, written by ``benchmarks/cell_costs.py``); an item
never measured costs the median of those that were.
"""
from __future__ import annotations

import heapq
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

COSTS_FILE = Path(__file__).with_name("costs.json")


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based, as a CI job matrix counts
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N`` with 1 <= I <= N; a clear error for anything else."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard {text!r} is not I/N, e.g. 1/4") from None
        if not 1 <= index <= count:
            raise ValueError(f"shard {text!r}: I must be between 1 and N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def load_costs(kind: str, path: Path = COSTS_FILE) -> dict[str, float]:
    """Measured seconds of ``kind`` ("cells": cell ids, "tests": pytest node ids)."""
    return json.loads(path.read_text()).get(kind, {}) if path.exists() else {}


def assign(items: Iterable[str], costs: dict[str, float], count: int) -> list[list[str]]:
    """Every item in exactly one of ``count`` shards, balanced by cost; each shard in input order."""
    items = list(dict.fromkeys(items))
    known = [costs[i] for i in items if i in costs]
    default = statistics.median(known) if known else 1.0
    cost = {item: costs.get(item, default) for item in items}
    loads = [(0.0, shard) for shard in range(count)]
    shards: list[set[str]] = [set() for _ in range(count)]
    for item in sorted(items, key=lambda i: (-cost[i], i)):
        load, shard = heapq.heappop(loads)
        shards[shard].add(item)
        heapq.heappush(loads, (load + cost[item], shard))
    return [[item for item in items if item in shard] for shard in shards]


def select(items: Iterable[str], shard: Shard, costs: dict[str, float]) -> list[str]:
    return assign(items, costs, shard.count)[shard.index - 1]
