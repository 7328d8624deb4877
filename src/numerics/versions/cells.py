"""Running cells inside an environment, and what a run reports when the environment cannot be built.

Cells run in a subprocess under the environment's interpreter and variables (its packages
first on ``PYTHONPATH``, its ``TORCH_EXTENSIONS_DIR``); the ranks are spawned from there
and inherit both, so the versions every record carries are the ones the ranks reported.

``numerics run --pin`` re-executes ``numerics run`` that way and so writes the usual table
and report. When the environment cannot be built, every selected cell gets the status
``cannot build`` with the reason, and the run exits `CANNOT_BUILD_EXIT` (3): not a pass,
and not a numerics failure (1) either.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from numerics.versions.environments import REPO_ROOT, Environment, build
from numerics.versions.resolve import CannotBuild, Pin

CANNOT_BUILD = "cannot build"
CANNOT_BUILD_EXIT = 3
RECORDS_BEGIN, RECORDS_END = "<<<numerics-env-records>>>", "<<<end-numerics-env-records>>>"


def run_pinned(pins: tuple[Pin, ...], run_arguments: list[str], specs: list[Any], report: Path,
               console: Console) -> int:
    """``numerics run RUN_ARGUMENTS`` inside the environment for ``pins``; its exit code, or
    `CANNOT_BUILD_EXIT` after reporting every cell of ``specs`` as "cannot build"."""
    try:
        environment = build(pins, console)
    except CannotBuild as err:
        write_cannot_build(specs, pins, err.reason, report, console)
        return CANNOT_BUILD_EXIT
    environment.mark_used()
    console.print(f"running in {environment.path} ({' '.join(map(str, pins))})")
    command = [str(environment.python), "-m", "numerics.show.cli", "run", *run_arguments]
    returncode = subprocess.run(command, env=environment.variables(), cwd=str(REPO_ROOT)).returncode
    for versions in rank_versions(report / "results.json") if returncode in (0, 1) else ():  # 0/1: it wrote one
        console.print(f"the ranks reported {versions}", highlight=False)
    return returncode


COMBINATION_ENV = "NUMERICS_COMBINATION"  # set inside a version-matrix pytest: the test ids carry it


def run_pytest_pinned(pins: tuple[Pin, ...], pytest_arguments: list[str], report: Path, console: Console) -> int:
    """``pytest PYTEST_ARGUMENTS --numerics-report REPORT`` inside the environment for ``pins``,
    the combination in every test id; its exit code, or `CANNOT_BUILD_EXIT` with the reason."""
    try:
        environment = build(pins, console)
    except CannotBuild as err:
        console.print(f"cannot build {' '.join(map(str, pins))}: {err.reason}", highlight=False)
        return CANNOT_BUILD_EXIT
    environment.mark_used()
    label = " ".join(map(str, pins))
    console.print(f"running pytest in {environment.path} ({label})")
    command = [str(environment.python), "-m", "pytest", *pytest_arguments, "--numerics-report", str(report)]
    variables = {**environment.variables(), COMBINATION_ENV: label.replace(" ", "-")}
    return subprocess.run(command, env=variables, cwd=str(REPO_ROOT)).returncode


def rank_versions(results: Path) -> list[str]:
    """Each distinct set of versions the ranks reported in a ``results.json``, as text."""
    try:
        cells = json.loads(results.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return []
    seen = {json.dumps(cell["trace"]["meta"].get("versions"), sort_keys=True) for cell in cells if cell.get("trace")}
    return [", ".join(f"{name} {version}" for name, version in json.loads(text).items()) for text in sorted(seen)
            if text != "null"]


def write_cannot_build(specs: list[Any], pins: tuple[Pin, ...], reason: str, directory: Path,
                       console: Console) -> None:
    """The table, ``results.json`` and ``junit.xml`` of a run whose environment could not be built:
    every cell "cannot build", with the installer's reason."""
    from numerics.run.launcher import CellOutcome
    from numerics.run.runner import evaluate
    from numerics.show.report import print_report, write_report

    results = [evaluate(CellOutcome(spec, cannot=(CANNOT_BUILD, f"{' '.join(map(str, pins))}: {reason}"))) for spec in specs]
    print_report(results, console)
    write_report(results, directory)


def run_cells_in(environment: Environment, specs: list[Any], timeout: float = 900.0, backend: str | None = None,
                 worker: int = 0) -> list[dict[str, Any]]:
    """Run ``specs`` (RunSpecs) through a `PoolSet` in a subprocess inside ``environment``.

    Verdicts are evaluated in the subprocess (the reference run uses the same releases as
    the ranks). One JSON record per spec, in the order given: ``cell``, ``status``,
    ``verdicts`` ([invariant, status, message]), ``measured`` (the figures each verdict was judged
    by, by invariant: what a known deviation's signature is checked against), ``versions`` (what the ranks reported),
    ``host_versions`` and ``modules`` (what the subprocess imported, and from where),
    ``losses``, ``adapter`` facts and ``error``. ``backend`` and ``worker`` go to the
    `PoolSet` (see numerics.show.plugin).
    """
    environment.mark_used()
    payload = json.dumps({"specs": [s.to_dict() for s in specs], "backend": backend, "worker": worker})
    command = [str(environment.python), "-m", "numerics.versions.cells"]
    try:
        done = subprocess.run(command, input=payload, capture_output=True, text=True, timeout=timeout,
                              env=environment.variables(), cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"cells in {environment.path} ran past {timeout:.0f}s:\n{(err.stderr or b'')[-4000:]!r}") from err
    records = _parse_records(done.stdout)
    if done.returncode != 0 or records is None:
        raise RuntimeError(f"cells in {environment.path} exited {done.returncode} without records:\n"
                           f"{done.stderr[-6000:]}\n{done.stdout[-2000:]}")
    return records


def _parse_records(stdout: str) -> list[dict[str, Any]] | None:
    """The records between the markers: DeepSpeed and transformers also print to stdout."""
    start, end = stdout.rfind(RECORDS_BEGIN), stdout.rfind(RECORDS_END)
    if start < 0 or end < start:
        return None
    return json.loads(stdout[start + len(RECORDS_BEGIN):end])


def _record_of(result: Any, host_versions: dict[str, str | None], modules: dict[str, Any]) -> dict[str, Any]:
    trace = result.outcome.trace
    meta = trace.meta if trace is not None else {}
    adapter_keys = ("trainable_dtypes", "frozen_dtypes", "stepped_dtypes", "optimizer_state_dtypes", "optimizer",
                    "lora_b_still_zero", "merge_logits_rel_error")
    return {
        "cell": result.spec.cell_id,
        "status": result.status,
        "verdicts": [[v.invariant, v.status, v.message] for v in result.verdicts],
        "measured": {v.invariant: v.measured for v in result.verdicts if v.measured},
        "versions": meta.get("versions"),
        "host_versions": host_versions,
        "modules": modules,
        "losses": trace.values("loss") if trace is not None else None,
        "adapter": {k: meta[k] for k in adapter_keys if k in meta},
        "error": result.outcome.error,
        "wall_s": result.outcome.wall_s,
    }


def _run_payload(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Body of the subprocess: run the cells through one PoolSet and evaluate them."""
    from numerics.cell.spec import RunSpec
    from numerics.run.platform import package_versions
    from numerics.run.runner import PoolSet
    from numerics.versions.probe import imported_from

    modules, host_versions = imported_from(), package_versions()
    specs = [RunSpec.from_dict(d) for d in payload["specs"]]
    results: list[Any] = [None] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: specs[i].world_size)  # run_all's order: each pool starts once
    with PoolSet(payload.get("backend"), payload.get("worker", 0)) as pools:
        for index, result in zip(order, pools.run_all(specs[i] for i in order)):
            results[index] = result
    return [_record_of(r, host_versions, modules) for r in results]


if __name__ == "__main__":
    records = _run_payload(json.loads(sys.stdin.read()))
    sys.stdout.write(f"\n{RECORDS_BEGIN}{json.dumps(records)}{RECORDS_END}\n")
    sys.stdout.flush()
