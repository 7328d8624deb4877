"""Loss and grad-norm curves of a cell against its reference (and golden), as an embeddable PNG.

The report page needs no network, so each figure is rendered here with matplotlib's
Agg backend and inlined as a ``data:`` URI.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

METRICS = (("loss", "loss"), ("grad_norm", "grad norm"))
DPI = 80


@dataclass
class Series:
    label: str
    values: dict[str, list[Any]]  # metric -> value per step ("nan"/"inf" strings as results.json writes them)
    style: dict[str, Any]


def number(value: Any) -> float:
    """A results.json value as a float to plot: None (not measured) is a gap, "nan"/"inf" are themselves."""
    return math.nan if value is None else float(value)


def cell_series(cell: dict[str, Any], label: str = "cell", style: dict[str, Any] | None = None) -> list[Series]:
    """The cell's own curves, its reference's and its golden's, from a results.json record."""
    steps = (cell.get("trace") or {}).get("steps") or []
    series = [Series(label, {m: [s.get(m) for s in steps] for m, _ in METRICS}, style or {"color": "C0", "lw": 1.6})]
    if cell.get("reference"):
        series.append(Series("reference", cell["reference"], {"color": "0.35", "ls": "--", "lw": 1.2}))
    if cell.get("golden"):
        series.append(Series("golden", cell["golden"], {"color": "C2", "ls": ":", "lw": 1.4}))
    return series


def figure_png(series: list[Series], first_bad_step: int | None, title: str) -> str:
    """Both metrics side by side, the first bad step marked; a ``data:image/png`` URI."""
    figure, axes = plt.subplots(1, len(METRICS), figsize=(9, 2.6), dpi=DPI)
    for axis, (metric, name) in zip(axes, METRICS):
        for line in series:
            values = [number(v) for v in line.values.get(metric) or []]
            if any(math.isfinite(v) for v in values):
                axis.plot(range(len(values)), values, label=line.label, **line.style)
        if first_bad_step is not None:
            axis.axvline(first_bad_step, color="red", lw=1, alpha=0.7, label=f"first bad step {first_bad_step}")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")  # "best" searches every position: slow, for no gain here
    figure.suptitle(title, fontsize=9)
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.17, top=0.82, wspace=0.15)  # fixed: tight_layout costs 40 %
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
