"""The version matrix: ``numerics run --versions deepspeed=0.18.0,0.19.8 --versions peft=0.6.2,0.7.0``.

Every combination of the listed releases (plus any ``--pin``) runs the selected cells in its
own environment, exactly as ``run --pin`` does, into ``REPORT/<combination>/``; then one
table and one ``REPORT/results.json`` put them side by side: cell x combination -> verdict.
The first combination is the baseline. A broken invariant fails its cell as usual; a
trace that only *moved* against the baseline's (`golden.compare`, the dtype tolerance) is
shown with the first step, metric and size, and fails only under ``--strict``.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from numerics.judge import golden
from numerics.judge.trace import Trace
from numerics.show.report import STATUS_STYLE, write_page
from numerics.show.results import SCHEMA
from numerics.versions.cells import CANNOT_BUILD_EXIT
from numerics.versions.resolve import BadPins, Pin, check_published, parse_pins

NON_FINITE = ("nan", "inf", "-inf")  # how results.finite_json writes them


def parse_axes(texts: list[str]) -> list[list[str]]:
    """``PKG=V1,V2`` per text -> for each package its pins as ``PKG==V`` strings. Raises `BadPins`."""
    axes, seen = [], set()
    for text in texts:
        name, _, versions = text.partition("=")
        releases = [v.strip() for v in versions.lstrip("=").split(",") if v.strip()]
        if not name or not releases:
            raise BadPins(f"malformed --versions {text!r}: write PKG=V1,V2,..., e.g. deepspeed=0.18.0,0.19.8")
        if name in seen:
            raise BadPins(f"--versions names {name} twice: list all its releases in one --versions")
        seen.add(name)
        axes.append([f"{name}=={release}" for release in releases])
    return axes


def combinations(axes: list[list[str]], pins: list[str]) -> list[tuple[Pin, ...]]:
    """Every combination of one release per axis, with the fixed ``pins``; the first is the
    baseline. Malformed, conflicting or unpublished releases raise `BadPins` before anything builds."""
    combos = [parse_pins([*pins, *choice]) for choice in itertools.product(*axes)]
    check_published(tuple({pin for combo in combos for pin in combo}))
    return combos


def label(combination: tuple[Pin, ...]) -> str:
    return " ".join(map(str, combination))


@dataclass
class Column:
    """One combination's run: its exit code and, per cell, its record from ``results.json``."""

    combination: tuple[Pin, ...]
    exit: int
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def directory_name(self) -> str:
        return "_".join(f"{pin.name}-{pin.version}" for pin in self.combination)


def without_options(arguments: list[str], dropped: tuple[str, ...], flags: tuple[str, ...] = ()) -> list[str]:
    """``arguments`` less the ``dropped`` options (``--x V`` or ``--x=V``; those in ``flags`` take
    no value): what the run inside each combination's environment is given."""
    kept, skip = [], False
    for argument in arguments:
        name = argument.split("=", 1)[0]
        if skip:
            skip = False
        elif name in dropped or name in flags:
            skip = "=" not in argument and name not in flags
        else:
            kept.append(argument)
    return kept


def run_matrix(combos: list[tuple[Pin, ...]], run_one: Callable[[tuple[Pin, ...], Path], int], cells: list[str] | None,
               report: Path, strict: bool, console: Console) -> int:
    """Run every combination (``run_one(combination, its report directory)`` returns its exit
    code), then write the combined table and ``results.json`` over ``cells`` (None: every cell
    any combination ran). Exit 1 if a cell failed (or moved, under ``strict``), 3 if no
    combination could be built, else 0."""
    columns = []
    for number, combo in enumerate(combos, 1):
        column = Column(combo, 0)
        directory = report / column.directory_name
        console.rule(f"combination {number}/{len(combos)}: {label(combo)}")
        column.exit = run_one(combo, directory)
        column.cells = _cell_records(directory / "results.json")
        columns.append(column)
    rows = compare_columns(columns, cells if cells is not None else list(dict.fromkeys(c for col in columns for c in col.cells)))
    console.print(matrix_table(columns, rows))
    write_matrix(columns, rows, report / "results.json")
    console.print(f"wrote {report}/results.json and report.html (and one report per combination beside them)")
    if all(column.exit == CANNOT_BUILD_EXIT for column in columns):
        return CANNOT_BUILD_EXIT
    failed = any(column.exit not in (0, 1, CANNOT_BUILD_EXIT) for column in columns) or \
        any(entry["status"] == "fail" for row in rows.values() for entry in row)
    moved = any(entry["moved"] for row in rows.values() for entry in row)
    return 1 if failed or (strict and moved) else 0


def _cell_records(results: Path) -> dict[str, dict[str, Any]]:
    try:
        return {cell["cell"]: cell for cell in json.loads(results.read_text())["cells"]}
    except (OSError, ValueError, KeyError):
        return {}


def compare_columns(columns: list[Column], cells: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per cell, per combination: its status, the invariants that failed, and how its trace
    moved against the baseline's (None when it did not, or either has no trace)."""
    rows = {}
    for cell in cells:
        base = _trace(columns[0].cells.get(cell))
        row = []
        for column in columns:
            record = column.cells.get(cell)
            trace = _trace(record)
            moved = golden.compare(trace, base) if trace is not None and base is not None else None
            row.append({"status": record["status"] if record else "missing",
                        "failed": [v["invariant"] for v in (record or {}).get("verdicts", []) if v["status"] in ("fail", "xpass")],
                        "deviations": sorted({v["reason"] for v in (record or {}).get("verdicts", []) if v.get("reason")}),
                        "moved": str(moved) if moved else None})
        rows[cell] = row
    return rows


def _trace(record: dict[str, Any] | None) -> Trace | None:
    """The trace of a ``results.json`` cell, its non-finite numbers (written as "nan", "inf") floats again."""
    if not record or not record.get("trace"):
        return None
    data = dict(record["trace"])
    data["steps"] = [{k: float(v) if v in NON_FINITE else v for k, v in step.items()} for step in data["steps"]]
    return Trace.from_json(data)


def matrix_table(columns: list[Column], rows: dict[str, list[dict[str, Any]]]) -> Table:
    table = Table(title="Version matrix (first combination is the baseline)")
    table.add_column("cell")
    for column in columns:
        table.add_column(label(column.combination))
    for cell, row in rows.items():
        table.add_row(cell, *(_entry_text(entry) for entry in row))
    return table


def _entry_text(entry: dict[str, Any]) -> str:
    style = STATUS_STYLE.get(entry["status"], "white")
    text = f"[{style}]{entry['status']}[/]" + (f" ({', '.join(entry['failed'])})" if entry["failed"] else "")
    return text + (f"\n[cyan]moved:[/] {entry['moved']}" if entry["moved"] else "")


def write_matrix(columns: list[Column], rows: dict[str, list[dict[str, Any]]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"schema": SCHEMA, "kind": "versions", "baseline": label(columns[0].combination),
            "combinations": [{"pins": [str(p) for p in c.combination], "exit": c.exit, "report": c.directory_name}
                             for c in columns],
            "cells": [{"cell": cell, "by_combination": dict(zip((label(c.combination) for c in columns), row))}
                      for cell, row in rows.items()]}
    path.write_text(json.dumps(data, indent=1))
    write_page(data, path.parent)
