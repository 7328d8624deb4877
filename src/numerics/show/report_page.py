"""``report.html``: one self-contained page per run, from its ``results.json`` data.

A matrix run shows a header (versions, machine, backend, commit), the cells as a
grid of stage x dtype columns against the other axes, coloured by verdict, and
every failing or deviating cell's curves over its reference with the first bad
step marked; passing cells' curves open on demand. A version matrix shows its
combinations side by side, a bisect the last good and first bad release overlaid.
Images are inlined: the page needs no network.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from numerics.judge.deviations import measured_text
from numerics.show.curves import Series, cell_series, figure_png
from numerics.show.results import ReportError, load

COLOURS = {"pass": "#2e7d32", "xfail": "#f9a825", "fail": "#c62828", "cannot run": "#8e24aa",
           "cannot build": "#8e24aa", "missing": "#9e9e9e"}
STAGE_DTYPE = re.compile(r"^zero(?P<stage>\d)-(?P<dtype>fp32|bf16|fp16)-?")
COLUMNS = [(stage, dtype) for stage in range(4) for dtype in ("fp32", "bf16", "fp16")]
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;vertical-align:top}
th{background:#f5f5f5;font-weight:600}.box{display:inline-block;width:14px;height:14px;margin:1px;border-radius:2px}
.status{color:#fff;padding:0 6px;border-radius:3px}.cell{margin:1.2em 0;padding:.6em;border-left:4px solid #ccc}
pre{background:#fafafa;padding:.5em;overflow-x:auto;font-size:12px;max-height:24em}
.header td:first-child{font-weight:600}img.curves{max-width:100%}
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def status_badge(status: str) -> str:
    return f'<span class="status" style="background:{COLOURS.get(status, "#555")}">{esc(status)}</span>'


def anchor(cell: str) -> str:
    return "cell-" + re.sub(r"[^A-Za-z0-9_-]", "_", cell)


def page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(body)}</body></html>")


# A curve costs ~0.2 s to draw: beyond this many passing cells (a nightly of the full product),
# theirs are drawn only when asked (numerics report DIR --all-curves), failing ones always.
PASSING_CURVES_MAX = 120


def render(data: dict[str, Any], directory: Path | None = None, all_curves: bool | None = None) -> str:
    """The page for a ``results.json`` (matrix), a version matrix's or a bisect's data."""
    if data.get("kind") == "versions":
        return versions_page(data, directory)
    if data.get("kind") == "bisect":
        return bisect_page(data)
    return matrix_page(data, all_curves)


# -- a matrix run ----------------------------------------------------------------------------
def header(data: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in (data.get("versions") or {}).items() if v)
    rows = [("summary", data.get("summary")), ("created", data.get("created")), ("versions", versions),
            ("backend", f"{data.get('backend')} on {data.get('device')}"), ("hardware", data.get("hardware")),
            ("git commit", data.get("git_commit")), ("merged from", data.get("merged_from"))]
    return "<table class='header'>" + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>"
                                              for k, v in rows if v is not None) + "</table>"


def variant(cell: str) -> tuple[tuple[int, str] | None, str]:
    """(stage, dtype) and the rest of the cell id (comm dtype, world size, the other axes)."""
    match = STAGE_DTYPE.match(cell)
    if not match:
        return None, cell
    return (int(match["stage"]), match["dtype"]), cell[match.end():] or "(defaults)"


def grid(cells: list[dict[str, Any]]) -> str:
    """Rows: the other axes; columns: stage x dtype; one box per cell, coloured by verdict."""
    rows: dict[str, dict[tuple[int, str], list[dict[str, Any]]]] = {}
    for cell in cells:
        column, rest = variant(cell["cell"])
        rows.setdefault(rest, {}).setdefault(column, []).append(cell)
    head = "<tr><th>other axes</th>" + "".join(f"<th>ZeRO-{s}<br>{d}</th>" for s, d in COLUMNS) + "<th>other</th></tr>"
    body = []
    for rest in sorted(rows):
        boxes = [rows[rest].get(column, []) for column in [*COLUMNS, None]]
        body.append(f"<tr><td>{esc(rest)}</td>" + "".join(f"<td>{''.join(box(c) for c in group)}</td>" for group in boxes)
                    + "</tr>")
    return f"<table class='grid'>{head}{''.join(body)}</table>"


def box(cell: dict[str, Any]) -> str:
    title = f"{cell['cell']}: {cell['status']}"
    first = next((v for v in cell["verdicts"] if v["status"] not in ("pass", "n/a")), None)
    if first:
        title += f" ({first['invariant']}{': ' + first['reason'] if first.get('reason') else ''})"
    return (f'<a href="#{anchor(cell["cell"])}" title="{esc(title)}"><span class="box" '
            f'style="background:{COLOURS.get(cell["status"], "#555")}"></span></a>')


def signature_table(verdict: dict[str, Any]) -> str:
    """A known deviation's signature beside what this verdict measured: whether the failure is the
    known one (xfail) or only looks like it by cell and release (fail) reads at a glance."""
    if not verdict.get("signature"):
        return ""
    return (f"<table class='signature'><tr><th>signature</th><th>measured</th></tr><tr><td>{esc(verdict['signature'])}</td>"
            f"<td>{esc(measured_text(verdict.get('measured') or {}))}</td></tr></table>")


def verdict_rows(cell: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{status_badge(v['status']) if v['status'] != 'n/a' else 'n/a'}</td><td>{esc(v['invariant'])}</td>"
                   f"<td>{esc(v['step'] if v.get('step') is not None else '')}</td><td>{esc(v['message'])}"
                   + (f"<br><b>known deviation:</b> {esc(v['reason'])}" if v.get("reason") else "")
                   + signature_table(v) + "</td></tr>"
                   for v in cell["verdicts"])
    return f"<table><tr><th>verdict</th><th>invariant</th><th>step</th><th>message</th></tr>{rows}</table>"


def cell_section(cell: dict[str, Any], open_: bool, curves: bool = True) -> str:
    """One cell: verdicts, error, and its curves over the reference (and golden)."""
    parts = [verdict_rows(cell)]
    if cell.get("error"):
        parts.append(f"<pre>{esc(cell['error'])}</pre>")
    if curves and (cell.get("trace") or {}).get("steps"):
        png = figure_png(cell_series(cell), cell.get("first_bad_step"), cell["cell"])
        parts.append(f'<img class="curves" alt="curves of {esc(cell["cell"])}" src="{png}">')
    summary = f"{status_badge(cell['status'])} <code>{esc(cell['cell'])}</code> ({cell.get('wall_s', 0):.1f} s)"
    return (f'<details id="{anchor(cell["cell"])}" class="cell" style="border-color:{COLOURS.get(cell["status"], "#555")}"'
            f'{" open" if open_ else ""}><summary>{summary}</summary>{"".join(parts)}</details>')


def matrix_page(data: dict[str, Any], all_curves: bool | None) -> str:
    cells = data["cells"]
    flagged = [c for c in cells if c["status"] != "pass"]
    passing = [c for c in cells if c["status"] == "pass"]
    curves = all_curves if all_curves is not None else len(passing) <= PASSING_CURVES_MAX
    body = [header(data), "<h2>Matrix</h2>", grid(cells),
            f"<h2>Failing, deviating and unrunnable cells ({len(flagged)})</h2>",
            "".join(cell_section(c, open_=True) for c in flagged) or "<p>none</p>",
            f"<h2>Passing cells ({len(passing)})</h2>",
            "" if curves else f"<p>{len(passing)} passing cells: their curves are drawn with "
                              "<code>numerics report DIR --all-curves</code>.</p>",
            "".join(cell_section(c, open_=False, curves=curves) for c in passing)]
    return page("Numerics report", body)


# -- a version matrix ------------------------------------------------------------------------
def versions_page(data: dict[str, Any], directory: Path | None) -> str:
    """Combinations side by side; for each cell that failed or moved anywhere, every
    combination's curves overlaid (read from the per-combination reports beside it)."""
    names = [" ".join(c["pins"]) for c in data["combinations"]]
    head = "<tr><th>cell</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"
    rows = []
    for row in data["cells"]:
        entries = list(row["by_combination"].values())
        rows.append(f"<tr><td><a href='#{anchor(row['cell'])}'>{esc(row['cell'])}</a></td>" + "".join(
            f"<td>{status_badge(e['status'])} {esc(', '.join(e['failed']))}"
            + (f"<br><small>moved: {esc(e['moved'])}</small>" if e.get("moved") else "") + "</td>" for e in entries) + "</tr>")
    reports = {}
    for combination, name in zip(data["combinations"], names):
        try:
            reports[name] = {c["cell"]: c for c in load(directory / combination["report"])["cells"]} if directory else {}
        except ReportError:
            reports[name] = {}
    plots = []
    for row in data["cells"]:
        entries = list(row["by_combination"].values())
        if not any(e["status"] != "pass" or e.get("moved") for e in entries):
            continue
        series = [cell_series(reports[name][row["cell"]], name, {"color": f"C{i}", "lw": 1.4})[0]
                  for i, name in enumerate(names) if row["cell"] in reports[name]]
        if series:
            plots.append(f'<div id="{anchor(row["cell"])}"><h3>{esc(row["cell"])}</h3>'
                         f'<img class="curves" src="{figure_png(series, None, row["cell"])}"></div>')
    body = [f"<p>baseline: {esc(data['baseline'])}</p>", f"<table>{head}{''.join(rows)}</table>",
            "<h2>Cells that failed or moved, all combinations overlaid</h2>", "".join(plots) or "<p>none</p>"]
    return page("Numerics version matrix", body)


# -- a bisect --------------------------------------------------------------------------------
def bisect_page(data: dict[str, Any]) -> str:
    package = data["package"]
    tried = "".join(f"<tr><td>{esc(t['release'])}</td><td>{esc(t['judgement'])}</td><td>{esc(t['reason'])}</td>"
                    f"<td>{t['seconds']}</td></tr>" for t in data["tried"])
    body = [f"<p>{esc(package)}: good {esc(data['good'])}, bad {esc(data['bad'])}; outcome: <b>{esc(data['outcome'])}</b></p>"]
    if "boundary" in data:
        body.append("<table class='header'>" + "".join(f"<tr><td>{esc(k)}</td><td>{esc(package)}=={esc(v)}</td></tr>"
                                                        for k, v in data["boundary"].items())
                    + f"<tr><td>cell</td><td>{esc(data['cell'])}</td></tr>"
                    + f"<tr><td>invariants</td><td>{esc(', '.join(data['invariants']))}</td></tr></table>")
        curves = data["curves"]
        series = [Series(f"{package}=={curves[side]['release']} ({side})", {"loss": curves[side]["losses"]},
                         {"color": colour, "lw": 1.5}) for side, colour in (("good", "C2"), ("bad", "C3"))]
        png = figure_png(series, data["losses"]["first_diverging_step"], data["cell"])
        body.append(f'<img class="curves" alt="good and bad release overlaid" src="{png}">')
        body.append("<h3>reproduce</h3><pre>" + esc("\n".join(data["reproduce"])) + "</pre>")
    body.append(f"<h2>Releases tried</h2><table><tr><th>release</th><th>judgement</th><th>reason</th><th>s</th></tr>{tried}</table>")
    return page(f"Numerics bisect: {package}", body)
