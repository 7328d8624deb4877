"""Results a person reads: a table on the terminal, ``results.json``, ``junit.xml`` and ``report.html``
(the file itself: `numerics.show.results`; the page: `numerics.show.report_page`).

Everything after the run works on ``results.json`` records, so a report can be
re-rendered (``numerics report DIR``) or merged from shards without the traces in memory.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from numerics.run.platform import package_versions
from numerics.run.runner import CANNOT, CellResult, cell_record, final_loss, first_failing, known, steps_per_s, story
from numerics.show.results import SCHEMA, ReportError, write_json

STATUS_STYLE = {"pass": "green", "xfail": "yellow", "fail": "bold red", "cannot run": "magenta", "cannot build": "magenta"}


def headline(message: str) -> str:
    return (message.splitlines() or [""])[0]


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


def summary_of(cells: list[dict[str, Any]], fp16_check_lifted: bool) -> str:
    counts = {status: sum(c["status"] == status for c in cells) for status in STATUS_STYLE}
    line = f"{counts['pass']} passed, {counts['fail']} failed, {counts['xfail']} xfailed (known deviations)"
    for status in CANNOT:
        if counts[status]:
            line += f", {counts[status]} {status}"
    if fp16_check_lifted:
        line += "; fp16 cells ran with DeepSpeed's CPU fp16 check lifted (no native fp16 on this processor)"
    return line


def fp16_check_lifted(results: list[CellResult]) -> bool:
    """Whether an fp16 cell ran with DeepSpeed's CPU fp16 check lifted (ranks lift it at start,
    so only a cell that computes or communicates in fp16 makes it worth saying)."""
    return any(r.outcome.trace and r.outcome.trace.meta.get("fp16_check_lifted")
               and "fp16" in (r.spec.dtype, r.spec.comm_dtype, r.spec.base_dtype) for r in results)


def summary_line(results: list[CellResult]) -> str:
    return summary_of([{"status": r.status} for r in results], fp16_check_lifted(results))


def git_commit() -> str | None:
    """The commit of the checkout the run started in, "+dirty" with local changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def hardware() -> str:
    """The processor (and GPUs, when there are), as the report's header names the machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    text = f"{cpu}, {os.cpu_count()} cores"
    import torch

    if torch.cuda.is_available():
        text += f"; {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return text


def run_header(results: list[CellResult]) -> dict[str, Any]:
    """What ran where: versions, backend and device (from the ranks), machine and commit."""
    meta = next((r.outcome.trace.meta for r in results if r.outcome.trace is not None), {})
    return {"versions": meta.get("versions") or package_versions(), "backend": meta.get("backend"),
            "device": meta.get("device"), "hardware": hardware(), "git_commit": git_commit(),
            "fp16_check_lifted": fp16_check_lifted(results)}


def results_data(results: list[CellResult], tests: dict[str, float] | None = None) -> dict[str, Any]:
    """``results.json`` as data: the header, the summary, every cell, and (from pytest) each test's seconds."""
    return {"schema": SCHEMA, "kind": "matrix", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **run_header(results), "summary": summary_line(results), "cells": [cell_record(r) for r in results],
            "tests": tests or {}}


def write_page(data: dict[str, Any], directory: Path, all_curves: bool | None = None) -> Path:
    """``report.html`` of a matrix run's, a version matrix's or a bisect's data."""
    from numerics.show.report_page import render

    path = directory / "report.html"
    path.write_text(render(data, directory, all_curves))
    return path


def write_data(data: dict[str, Any], directory: Path, all_curves: bool | None = None) -> None:
    """``results.json``, ``junit.xml`` and ``report.html`` of ``data`` in ``directory``."""
    write_json(data, directory / "results.json")
    write_junit(data["cells"], directory / "junit.xml")
    write_page(data, directory, all_curves)


def write_report(results: list[CellResult], directory: Path, tests: dict[str, float] | None = None,
                 all_curves: bool | None = None) -> None:
    """The report of judged cells; ``all_curves`` as `write_page` takes it (None: the page decides)."""
    write_data(results_data(results, tests), directory, all_curves)


def write_junit(cells: list[dict[str, Any]], path: Path) -> None:
    suite = ET.Element("testsuite", name="numerics", tests=str(len(cells)),
                       failures=str(sum(c["status"] == "fail" for c in cells)),
                       skipped=str(sum(c["status"] in ("xfail", *CANNOT) for c in cells)))
    for cell in cells:
        case = ET.SubElement(suite, "testcase", classname="numerics.cell.matrix", name=cell["cell"], time=f"{cell['wall_s']:.2f}")
        first = first_failure(cell)
        if cell["status"] == "fail":
            ET.SubElement(case, "failure", message=f"{first['invariant']}: {headline(first['message'])}").text = story(cell)
        elif cell["status"] == "xfail":
            ET.SubElement(case, "skipped", message=f"known deviation: {known(first)}").text = story(cell)
        elif cell["status"] in CANNOT:
            ET.SubElement(case, "skipped", message=f"{cell['status']}: {headline(first['message'])}").text = story(cell)
    ET.ElementTree(suite).write(path, encoding="unicode", xml_declaration=True)


def first_failure(cell: dict[str, Any]) -> dict[str, Any] | None:
    return first_failing(cell["verdicts"], lambda v: v["status"])


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from shards (or pytest-xdist workers) of one run: their cells and tests
    together, in order. A cell id may appear more than once, as in one pytest session: two
    tests may run the same cell (a matrix cell and a test that compares against it)."""
    if not reports:
        raise ReportError("nothing to merge")
    merged = {**reports[0], "cells": [cell for report in reports for cell in report["cells"]],
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "tests": {k: v for report in reports for k, v in report.get("tests", {}).items()},
              "merged_from": len(reports)}
    merged["summary"] = summary_of(merged["cells"], merged.get("fp16_check_lifted", False))
    return merged


def failed(data: dict[str, Any]) -> bool:
    """Whether a report holds a failure: a failing cell, in any combination of a version
    matrix, or a bisect that found a change."""
    kind = data.get("kind", "matrix")
    if kind == "versions":
        return any(e["status"] == "fail" for row in data["cells"] for e in row["by_combination"].values())
    if kind == "bisect":
        return "boundary" in data
    return any(c["status"] == "fail" for c in data["cells"])


def summary_markdown(data: dict[str, Any]) -> str:
    """The run as a CI job summary: the summary line, then every failing cell with its first
    failed invariant, step and message."""
    if data.get("kind", "matrix") != "matrix":
        return f"## Numerics {data.get('kind')}\n\nsee report.html"
    lines = ["## Numerics", "", data["summary"], ""]
    failing = [c for c in data["cells"] if c["status"] == "fail"]
    if failing:
        lines += ["| cell | invariant | step | message |", "|---|---|---|---|"]
        for cell in failing:
            first = first_failure(cell) or {}
            message = headline(first.get("message", "")).replace("|", "\\|")[:200]
            lines.append(f"| `{cell['cell']}` | {first.get('invariant', '')} | {first.get('step') or ''} | {message} |")
    return "\n".join(lines)


def print_report(results: list[CellResult], console: Console | None = None) -> None:
    console = console or Console()
    console.print(results_table(results))
    for result in results:
        if result.status == "fail":
            console.print(f"[bold red]FAILED[/] {escape(result.story())}", markup=True, highlight=False)
    console.print(summary_line(results))
