"""pytest plugin: the ``multigpu`` marker, options, and fixtures that run cells.

Registered through the ``pytest11`` entry point, so any project that installs
numerics can write ``def test_x(run_cell): run_cell(RunSpec(...))``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from numerics.cell.spec import RunSpec
from numerics.judge import golden
from numerics.run.runner import CANNOT, CellResult, PoolSet, interrupt_on_sigterm
from numerics.show.shard import Shard, load_costs, select
from numerics.versions.cells import COMBINATION_ENV

RESULTS_KEY = pytest.StashKey[list]()
SECONDS_KEY = pytest.StashKey[dict]()
POOLS_KEY = pytest.StashKey[PoolSet]()
REUSED_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("numerics")
    group.addoption("--world-size", type=int, default=None, help="run only matrix cells of this world size")
    group.addoption("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with a GPU per rank, else gloo")
    group.addoption("--numerics-report", metavar="DIR", default=None, help="write results.json and junit.xml of the cells run")
    group.addoption("--numerics-cover", choices=("pairs", "triples", "full"), default="triples",
                    help="which cells of each matrix family (numerics.matrix.COVERS): triples (default), pairs, full")
    group.addoption("--numerics-full", dest="numerics_cover", action="store_const", const="full", help="--numerics-cover full")
    group.addoption("--numerics-shard", metavar="I/N", default=None,
                    help="run only the I-th of N slices of the selected tests, balanced by measured cost (1-based)")
    group.addoption("--numerics-golden", metavar="DIR", default=None,
                    help="compare every cell's trace with its golden in DIR (numerics golden record)")
    group.addoption("--numerics-versions", metavar="PKG=V1,V2", action="append", default=[],
                    help="run the selection in every combination of these releases (repeatable), each in its "
                         "environment, the combination in the test ids; one combined table and results.json")
    group.addoption("--numerics-pin", metavar="PKG==V", action="append", default=[],
                    help="with --numerics-versions: held in every combination (repeatable)")
    group.addoption("--numerics-strict", action="store_true",
                    help="with --numerics-versions: a trace that moved against the first combination fails")


# The version-matrix options: the outer session consumes them, the sessions inside each environment never see them.
MATRIX_OPTIONS, MATRIX_FLAGS = ("--numerics-versions", "--numerics-pin", "--numerics-report"), ("--numerics-strict",)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """With ``--numerics-versions``: run this same pytest once per combination inside its
    environment (`numerics.versions.combinations`), instead of here; exit 2 on bad input."""
    if not config.getoption("numerics_versions") or os.environ.get(COMBINATION_ENV):
        return None
    from rich.console import Console

    from numerics.versions.cells import run_pytest_pinned
    from numerics.versions.combinations import combinations, parse_axes, run_matrix, without_options
    from numerics.versions.resolve import BadPins

    console = Console()
    try:
        combos = combinations(parse_axes(config.getoption("numerics_versions")), config.getoption("numerics_pin"))
    except BadPins as err:
        console.print(f"error: {err}", highlight=False)
        return 2
    arguments = without_options(list(config.invocation_params.args), MATRIX_OPTIONS, MATRIX_FLAGS)
    report = Path(config.getoption("numerics_report") or "reports/versions")
    return run_matrix(combos, lambda combo, directory: run_pytest_pinned(combo, arguments, directory, console),
                      None, report, config.getoption("numerics_strict"), console)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Inside a version-matrix session, every test that runs cells carries the combination in its id."""
    combination = os.environ.get(COMBINATION_ENV)
    if combination and "numerics_combination" in metafunc.fixturenames:
        metafunc.parametrize("numerics_combination", [combination], ids=[combination])


@pytest.fixture
def numerics_combination() -> str | None:
    """The release combination this session runs in (``--numerics-versions``), or None."""
    return os.environ.get(COMBINATION_ENV)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multigpu: launches multi-rank training runs (CPU/gloo without GPUs)")
    config.stash[RESULTS_KEY] = []
    config.stash[SECONDS_KEY] = {}
    if config.getoption("numerics_shard"):
        try:
            Shard.parse(config.getoption("numerics_shard"))
        except ValueError as err:
            raise pytest.UsageError(f"--numerics-shard: {err}") from None
    directory = config.getoption("numerics_report")
    if directory and not xdist_worker(config):
        shutil.rmtree(Path(directory) / "workers", ignore_errors=True)  # an earlier session's, never merged into this one
    interrupt_on_sigterm()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--numerics-shard I/N``: keep this shard's tests. Every runner (and every xdist worker)
    computes the same split from the same collection."""
    if not (text := config.getoption("numerics_shard")):
        return
    kept = set(select([item.nodeid for item in items], Shard.parse(text), load_costs("tests")))
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in kept])
    items[:] = [item for item in items if item.nodeid in kept]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Each test's seconds (set-up, call, tear-down): what shards are balanced by next time."""
    report = yield
    seconds = item.config.stash[SECONDS_KEY]
    seconds[item.nodeid] = seconds.get(item.nodeid, 0.0) + report.duration
    return report


def xdist_worker(config: pytest.Config) -> str | None:
    """This session's pytest-xdist worker id ("gw0", ...), None in a controller or without xdist.

    Read from the config xdist hands its workers, not ``PYTEST_XDIST_WORKER``: a pytest that a
    test starts inherits that variable from the worker running the test, and would take itself
    for a worker (never merging its own workers' reports)."""
    return getattr(config, "workerinput", {}).get("workerid")


def worker_index(config: pytest.Config) -> int:
    worker = xdist_worker(config) or "gw0"
    return int(worker[2:]) if worker.startswith("gw") else 0


@pytest.fixture(scope="session")
def numerics_pools(request: pytest.FixtureRequest):
    """Persistent rank pools for the session (per xdist worker); closed when pytest ends."""
    pools = PoolSet(request.config.getoption("backend"), worker_index(request.config))
    request.config.stash[POOLS_KEY] = pools
    yield pools
    pools.close()


@pytest.fixture
def run_cell(numerics_pools: PoolSet, numerics_combination: str | None, request: pytest.FixtureRequest):
    """Run a `RunSpec` through the pool; returns its `CellResult` (verdicts already evaluated).

    ``run_cell(spec, reuse=True)`` returns the result of the same spec if this session ran it
    already with ``reuse=True`` (a fault's clean twin is often a matrix cell): a cell is a pure
    function of its spec, fp32 bit for bit (tests/test_pool.py). A test that compares two runs
    of one spec leaves ``reuse`` off."""

    golden_dir = request.config.getoption("numerics_golden")
    ran: dict[RunSpec, CellResult] = request.config.stash.setdefault(REUSED_KEY, {})

    def run(spec: RunSpec, reuse: bool = False) -> CellResult:
        if reuse and spec in ran:
            return ran[spec]
        result = numerics_pools.run(spec)
        if reuse:
            ran[spec] = result
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
        from numerics.run.runner import known

        reasons = sorted({known(vars(v)) for v in result.verdicts if v.status == "xfail"})
        pytest.xfail("known deviation: " + " | ".join(reasons))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the report: a pytest-xdist worker writes its own beside the others, and the
    controller, which runs no cell, merges them (no worker overwrites another's cells)."""
    directory = session.config.getoption("numerics_report")
    if not directory:
        return
    from numerics.show import report
    from numerics.show.results import load, write_json

    results, seconds = session.config.stash.get(RESULTS_KEY, []), session.config.stash.get(SECONDS_KEY, {})
    worker = xdist_worker(session.config)
    parts = Path(directory) / "workers"
    if worker:
        write_json(report.results_data(results, seconds), parts / worker / "results.json")
    elif parts.is_dir():
        shards = [load(path.parent) for path in sorted(parts.glob("*/results.json"))]
        report.write_data(report.merge(shards), Path(directory))
    elif results:
        report.write_report(results, Path(directory), seconds)
