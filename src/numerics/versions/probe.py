"""What this Python process imports for each tracked package, and from which directory.

Run as ``python -m numerics.versions.probe`` inside an environment it prints one JSON
object: the import check of every build, and the evidence in every record that the
ranks' releases came from the environment and torch from the main venv.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

OVERLAY_VARIABLE = "NUMERICS_OVERLAY"  # set by an overlay's environment: its directory


def imported_from(overlay: str | None = None) -> dict[str, dict[str, Any]]:
    """Version and file of each tracked package as imported here; ``from_overlay`` when it
    came from ``overlay`` (default: this process's ``NUMERICS_OVERLAY``)."""
    from numerics.run.platform import TRACKED_PACKAGES, package_versions

    overlay = overlay or os.environ.get(OVERLAY_VARIABLE)
    prefix = str(Path(overlay).resolve()) + os.sep if overlay else None
    versions = package_versions()
    modules = {}
    for name in TRACKED_PACKAGES:
        file = str(Path(__import__(name).__file__).resolve())
        modules[name] = {"version": versions[name], "file": file,
                         "from_overlay": prefix is not None and file.startswith(prefix)}
    return modules


if __name__ == "__main__":
    json.dump(imported_from(), sys.stdout)
