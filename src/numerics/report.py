"""Results a person reads: a table on the terminal, ``results.json`` and ``junit.xml``."""
from __future__ import annotations

import json
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from numerics.platform import package_versions
from numerics.runner import CANNOT, CellResult

STATUS_STYLE = {"pass": "green", "xfail": "yellow", "fail": "bold red", "cannot run": "magenta", "cannot build": "magenta"}


def headline(message: str) -> str:
    return (message.splitlines() or [""])[0]


def final_loss(result: CellResult) -> float | None:
    trace = result.outcome.trace
    return trace.steps[-1].loss if trace and trace.steps else None


def steps_per_s(result: CellResult) -> float | None:
    trace = result.outcome.trace
    return trace.meta.get("steps_per_s") if trace else None


def results_table(results: Iterable[CellResult]) -> Table:
    table = Table(title="Numerics matrix", show_lines=False)
    for column in ("cell", "verdict", "first failing invariant", "final loss", "steps/s"):
        table.add_column(column, justify="right" if column in ("final loss", "steps/s") else "left")
    for result in results:
        first = result.first_failure
        loss, speed = final_loss(result), steps_per_s(result)
        table.add_row(
            escape(result.spec.cell_id),
            f"[{STATUS_STYLE[result.status]}]{result.status}[/]",
            escape(f"{first.invariant}: {headline(first.message)[:90]}") if first else "",
            f"{loss:.4f}" if loss is not None else "-",
            f"{speed:.1f}" if speed is not None else "-",
        )
    return table


def summary_line(results: list[CellResult]) -> str:
    counts = {status: sum(r.status == status for r in results) for status in STATUS_STYLE}
    line = f"{counts['pass']} passed, {counts['fail']} failed, {counts['xfail']} xfailed (known deviations)"
    for status in CANNOT:
        if counts[status]:
            line += f", {counts[status]} {status}"
    if any(r.outcome.trace and r.outcome.trace.meta.get("fp16_check_lifted") for r in results):
        line += "; fp16 cells ran with DeepSpeed's CPU fp16 check lifted (no native fp16 on this processor)"
    return line


def cell_record(result: CellResult) -> dict:
    trace = result.outcome.trace
    return {
        "cell": result.spec.cell_id,
        "status": result.status,
        "spec": result.spec.to_dict(),
        "verdicts": [vars(v) for v in result.verdicts],
        "final_loss": final_loss(result),
        "steps_per_s": steps_per_s(result),
        "wall_s": result.outcome.wall_s,
        "error": result.outcome.error,
        "trace": trace.to_json() if trace else None,
    }


def finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(results: list[CellResult], path: Path) -> None:
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": package_versions(),
            "summary": summary_line(results), "cells": [cell_record(r) for r in results]}
    # Non-finite floats become strings: bare NaN is not JSON, and a NaN loss is exactly what a report must show.
    path.write_text(json.dumps(finite_json(data), indent=1, default=str, allow_nan=False))


def write_junit(results: list[CellResult], path: Path) -> None:
    suite = ET.Element("testsuite", name="numerics", tests=str(len(results)),
                       failures=str(sum(r.status == "fail" for r in results)),
                       skipped=str(sum(r.status in ("xfail", *CANNOT) for r in results)))
    for result in results:
        case = ET.SubElement(suite, "testcase", classname="numerics.matrix", name=result.spec.cell_id,
                             time=f"{result.outcome.wall_s:.2f}")
        first = result.first_failure
        if result.status == "fail":
            ET.SubElement(case, "failure", message=f"{first.invariant}: {headline(first.message)}").text = result.story()
        elif result.status == "xfail":
            ET.SubElement(case, "skipped", message=f"known deviation: {first.reason}").text = result.story()
        elif result.status in CANNOT:
            ET.SubElement(case, "skipped", message=f"{result.status}: {headline(first.message)}").text = result.story()
    ET.ElementTree(suite).write(path, encoding="unicode", xml_declaration=True)


def write_report(results: list[CellResult], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_json(results, directory / "results.json")
    write_junit(results, directory / "junit.xml")


def print_report(results: list[CellResult], console: Console | None = None) -> None:
    console = console or Console()
    console.print(results_table(results))
    for result in results:
        if result.status == "fail":
            console.print(f"[bold red]FAILED[/] {escape(result.story())}", markup=True, highlight=False)
    console.print(summary_line(results))
