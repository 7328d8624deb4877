"""Golden traces: a passing cell's per-step trace, kept, and later runs compared with it.

A golden is one small JSON per cell id: the trace's steps (loss, grad norms, loss scale),
its spec, the versions the ranks ran and the hardware class (CPU/gloo or the GPU model on
NCCL), so a trace that moved says against what. Comparison uses the cell's dtype
tolerance (`thresholds.tolerance`) with parity's near-zero floor, as parity does, and names the first step and
metric that moved, and how far the furthest step went. The same comparison tells a
version matrix combination that moved against its baseline (`versions/combinations.py`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numerics.judge.invariants import Verdict, close, near_zero_atol, relative
from numerics.judge.thresholds import tolerance
from numerics.judge.trace import Trace

# metric -> the Tolerance field bounding it: what a golden compares at every step
COMPARED = {"loss": "loss_rtol", "grad_norm": "grad_rtol", "grad_norm_reported": "grad_rtol"}
GOLDEN_INVARIANT = "matches_golden"


@dataclass(frozen=True)
class Moved:
    """How a trace departs from the one it is compared with."""

    step: int
    metric: str
    value: float | None
    expected: float | None
    rel: float  # at the first step that moved
    largest: float  # the largest relative difference of that metric over all steps
    rtol: float
    dtype: str

    def __str__(self) -> str:
        largest = f"; largest {self.largest:.3g}" if math.isfinite(self.largest) and self.largest > self.rel else ""
        return (f"{self.metric} moved at step {self.step}: {_text(self.value)} vs {_text(self.expected)} "
                f"(relative {self.rel:.3g} > {self.rtol:g}, {self.dtype}{largest})")


def hardware_class(trace: Trace) -> str:
    meta = trace.meta
    return f"{meta.get('device', '?')}/{meta.get('backend', '?')}/ws{meta.get('world_size', '?')}"


def compare(trace: Trace, expected: Trace) -> Moved | None:
    """The first (step, metric) at which ``trace`` leaves ``expected`` beyond the tolerance of
    ``expected``'s precision, or None. A metric present in one and missing in the other moved; so did a
    trace with more or fewer steps (at the first step only one has); NaN equals NaN."""
    spec = expected.spec  # the golden's precision bounds the comparison, whatever the new run's config became
    bounds = tolerance(spec.get("dtype", "fp32"), spec.get("comm_dtype"), spec.get("base_dtype"), spec.get("lora", False))
    first: Moved | None = None
    for metric, field in COMPARED.items():
        rtol = getattr(bounds, field)
        gaps = [(step, *_gap(trace, expected, metric, step)) for step in range(max(len(trace.steps), len(expected.steps)))]
        atol = near_zero_atol(rtol, next((golden for _, _, golden, _ in gaps if golden is not None), None))
        moved = [(step, value, golden, rel) for step, value, golden, rel in gaps
                 if not (rel <= rtol or (value is not None and golden is not None and close(value, golden, rtol, atol)))]
        if moved and (first is None or moved[0][0] < first.step):
            step, value, golden, rel = moved[0]
            largest = max(rel for *_, rel in moved if not math.isnan(rel)) if any(not math.isnan(m[3]) for m in moved) else rel
            first = Moved(step, metric, value, golden, rel, largest, rtol, spec.get("dtype", "fp32"))
    return first


def _gap(trace: Trace, expected: Trace, metric: str, step: int) -> tuple[float | None, float | None, float]:
    """(value, expected, relative difference) of ``metric`` at ``step``; inf when only one side has it."""
    value = getattr(trace.steps[step], metric) if step < len(trace.steps) else None
    golden = getattr(expected.steps[step], metric) if step < len(expected.steps) else None
    if value is None and golden is None:
        return value, golden, 0.0
    if value is None or golden is None:
        return value, golden, math.inf
    if math.isnan(value) and math.isnan(golden):
        return value, golden, 0.0
    return value, golden, relative(value, golden)


def _text(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6g}"


# -- the golden directory ------------------------------------------------------------------
def path_of(directory: Path, cell_id: str) -> Path:
    return directory / f"{cell_id}.json"


def save(trace: Trace, directory: Path) -> None:
    data = {"cell": trace.cell, "hardware": hardware_class(trace), "versions": trace.meta.get("versions"),
            "spec": trace.spec, "steps": [_step_json(s) for s in trace.to_json()["steps"]]}
    directory.mkdir(parents=True, exist_ok=True)
    path_of(directory, trace.cell).write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")


def load(directory: Path, cell_id: str) -> tuple[Trace, dict[str, Any]] | None:
    """The golden trace of ``cell_id`` and its header (hardware, versions), or None if there is none."""
    path = path_of(directory, cell_id)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    trace = Trace.from_json({"cell": data["cell"], "spec": data["spec"], "steps": data["steps"]})
    return trace, {"hardware": data.get("hardware"), "versions": data.get("versions")}


def _step_json(step: dict[str, Any]) -> dict[str, Any]:
    """What a golden keeps of a step: the compared metrics and what explains them."""
    return {k: step[k] for k in ("step", "loss", *COMPARED, "loss_scale", "skipped") if k in step}


def verdict(trace: Trace, directory: Path) -> Verdict:
    """``matches_golden`` for one cell: fail when it moved, n/a (reported, never pass) when
    ``directory`` holds no golden for it."""
    found = load(directory, trace.cell)
    if found is None:
        return Verdict(GOLDEN_INVARIANT, "n/a", f"[{trace.cell}] no golden in {directory}: "
                       f"record one with numerics golden record --cells '{trace.cell}' --dir {directory}")
    golden, header = found
    moved = compare(trace, golden)
    against = f"golden from {header['hardware']} with {_versions(header['versions'])}"
    if moved is None:
        return Verdict(GOLDEN_INVARIANT, "pass", against)
    here = f"this run {hardware_class(trace)} with {_versions(trace.meta.get('versions'))}"
    return Verdict(GOLDEN_INVARIANT, "fail", f"[{trace.cell}] {moved}; {against}, {here}", step=moved.step)


def _versions(versions: dict[str, str | None] | None) -> str:
    return ", ".join(f"{name} {version}" for name, version in (versions or {}).items() if version) or "unknown versions"


def judge(result: Any, directory: Path) -> None:
    """Add ``matches_golden`` to a `CellResult` that trained (one that never did has nothing to
    compare), and keep the golden on it for the report's curves."""
    trace = result.outcome.trace
    if trace is not None:
        result.verdicts.append(verdict(trace, directory))
        found = load(directory, trace.cell)
        result.golden = found[0] if found else None


def record(results: list[Any], directory: Path, update: bool) -> list[str]:
    """Store the trace of every passing cell of ``results``; one line per cell saying what
    happened. An existing golden is rewritten only with ``update``, and either way the line
    says whether the new trace moved against it: updating is explicit and shows its diff."""
    lines = []
    for result in results:
        cell, trace = result.spec.cell_id, result.outcome.trace
        if result.status != "pass" or trace is None:
            lines.append(f"{cell}: not recorded, the cell is {result.status}")
            continue
        found = load(directory, cell)
        moved = compare(trace, found[0]) if found else None
        change = "new" if found is None else f"moved: {moved}" if moved else "unchanged"
        if found is None or update:
            save(trace, directory)
            lines.append(f"{cell}: recorded ({change})")
        else:
            lines.append(f"{cell}: kept the existing golden ({change}); --update replaces it")
    return lines
