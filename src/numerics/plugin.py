"""pytest plugin: the ``multigpu`` marker, options, and fixtures that run cells.

Registered through the ``pytest11`` entry point, so any project that installs
numerics can write ``def test_x(run_cell): run_cell(RunSpec(...))``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from numerics import golden
from numerics.runner import CANNOT, CellResult, PoolSet
from numerics.spec import RunSpec

RESULTS_KEY = pytest.StashKey[list]()
POOLS_KEY = pytest.StashKey[PoolSet]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("numerics")
    group.addoption("--world-size", type=int, default=None, help="run only matrix cells of this world size")
    group.addoption("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with a GPU per rank, else gloo")
    group.addoption("--numerics-report", metavar="DIR", default=None, help="write results.json and junit.xml of the cells run")
    group.addoption("--numerics-full", action="store_true", help="the full matrix product instead of the covering subset")
    group.addoption("--numerics-golden", metavar="DIR", default=None,
                    help="compare every cell's trace with its golden in DIR (numerics golden record)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multigpu: launches multi-rank training runs (CPU/gloo without GPUs)")
    config.stash[RESULTS_KEY] = []


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") else 0


@pytest.fixture(scope="session")
def numerics_pools(request: pytest.FixtureRequest):
    """Persistent rank pools for the session (per xdist worker); closed when pytest ends."""
    pools = PoolSet(request.config.getoption("backend"), _worker_index())
    request.config.stash[POOLS_KEY] = pools
    yield pools
    pools.close()


@pytest.fixture
def run_cell(numerics_pools: PoolSet, request: pytest.FixtureRequest):
    """Run a `RunSpec` through the pool; returns its `CellResult` (verdicts already evaluated)."""

    golden_dir = request.config.getoption("numerics_golden")

    def run(spec: RunSpec) -> CellResult:
        result = numerics_pools.run(spec)
        if golden_dir:
            golden.judge(result, Path(golden_dir))
        request.config.stash[RESULTS_KEY].append(result)
        return result

    return run


def expect_pass(result: CellResult) -> None:
    """Fail with the cell's whole story, xfail with the known deviation's reason, or skip a cell
    the installed release cannot run, saying which API it lacks."""
    if result.status in CANNOT:
        pytest.skip(f"{result.status}: {result.verdicts[0].message}")
    if result.status == "fail":
        pytest.fail(result.story(), pytrace=False)
    if result.status == "xfail":
        reasons = sorted({v.reason for v in result.verdicts if v.status == "xfail"})
        pytest.xfail("known deviation: " + " | ".join(reasons))


def pytest_sessionfinish(session: pytest.Session) -> None:
    directory = session.config.getoption("numerics_report")
    results = session.config.stash.get(RESULTS_KEY, [])
    if directory and results:
        from numerics.report import write_report

        write_report(results, Path(directory))
