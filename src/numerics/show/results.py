"""``results.json`` on disk: its schema version, writing it, and reading it back.

Every report, merge, version matrix and bisect reads and writes the file through here
(docs/results-schema.md); ``report.html`` (`report_page`) reads the per-combination
reports of a version matrix the same way.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = 2  # results.json's schema version (docs/results-schema.md); bump on any incompatible change


def finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Non-finite floats become strings: bare NaN is not JSON, and a NaN loss is exactly what a report must show.
    path.write_text(json.dumps(finite_json(data), indent=1, default=str, allow_nan=False))


def load(directory: Path) -> dict[str, Any]:
    """A report's ``results.json``; a clear error for a directory that holds none or an older schema."""
    path = directory / "results.json"
    if not path.exists():
        raise ReportError(f"{directory} holds no results.json (write one with numerics run --report {directory})")
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ReportError(f"{path} has schema {data.get('schema')!r}; this numerics reads schema {SCHEMA}: rerun the cells")
    return data


class ReportError(ValueError):
    """A report directory that cannot be read or merged."""
