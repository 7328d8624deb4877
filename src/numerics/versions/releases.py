"""What the package index publishes: the releases of a package and when each was uploaded.

Existence is asked of ``pip index versions``, which sees the same indexes and find-links
as the installer (this machine's pip configuration included), so "published" means
"installable from here". Upload dates come from PyPI's JSON API, the one place that has
them; they are only needed by the date policy of `numerics.versions.resolve`.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from datetime import datetime
from functools import lru_cache

from packaging.version import InvalidVersion, Version

INDEX_TIMEOUT_S = 60.0
PYPI_JSON = "https://pypi.org/pypi/{name}/json"


class IndexUnreachable(RuntimeError):
    """The package index did not answer, so nothing can be resolved or installed."""


@lru_cache(maxsize=None)
def published_versions(package: str) -> tuple[Version, ...]:
    """Every release of ``package`` pip can install from here, oldest first; () if none."""
    done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package, "--pre",
                           "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=INDEX_TIMEOUT_S)
    listed = re.search(r"^Available versions: (.*)$", done.stdout, re.MULTILINE)
    if listed is None:
        if "No matching distribution" in done.stderr:
            return ()
        raise IndexUnreachable(f"pip index versions {package}: {_last_line(done.stderr)}")
    versions = set()
    for text in listed.group(1).split(","):
        try:
            versions.add(Version(text.strip()))
        except InvalidVersion:
            continue  # a legacy version string no pin can name
    return tuple(sorted(versions))


def nearest(package: str, wanted: str, count: int = 6) -> list[str]:
    """The ``count`` published releases closest to ``wanted`` in version order, pre-releases
    only when ``wanted`` is one."""
    target = Version(wanted)
    candidates = [v for v in published_versions(package) if target.is_prerelease or not v.is_prerelease]
    below = [v for v in candidates if v < target][-(count // 2):]
    above = [v for v in candidates if v > target][:count - len(below)]
    return [str(v) for v in below + above]


def is_published(package: str, version: str) -> bool:
    """True when the index has exactly this release (``2.13.0`` matches ``2.13.0``, not ``2.13.0+cpu``)."""
    return Version(version) in published_versions(package)


@lru_cache(maxsize=None)
def upload_times(package: str) -> dict[Version, datetime]:
    """When each non-yanked release of ``package`` was first uploaded to PyPI."""
    try:
        with urllib.request.urlopen(PYPI_JSON.format(name=package), timeout=INDEX_TIMEOUT_S) as answer:
            releases = json.load(answer)["releases"]
    except OSError as err:
        raise IndexUnreachable(f"PyPI JSON API for {package}: {err}") from err
    times = {}
    for text, files in releases.items():
        uploads = [f["upload_time_iso_8601"] for f in files if not f.get("yanked")]
        try:
            version = Version(text)
        except InvalidVersion:
            continue
        if uploads:
            times[version] = datetime.fromisoformat(min(uploads).replace("Z", "+00:00"))
    return times


def newest_before(package: str, moment: datetime) -> Version | None:
    """The newest final release of ``package`` uploaded before ``moment``, or None."""
    older = [v for v, uploaded in upload_times(package).items() if uploaded <= moment and not v.is_prerelease]
    return max(older, default=None)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if not line.startswith("WARNING")]
    return lines[-1] if lines else "no answer"
