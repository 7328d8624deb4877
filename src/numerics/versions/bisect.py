"""``numerics bisect``: the first published release of a package that turned a cell red (or green).

The search is `git bisect` over releases instead of commits: both ends are judged first,
then the middle of what is left, until the last good and the first bad release are
adjacent. A release that cannot tell us anything about the bisected failure is skipped,
as ``git bisect skip`` does: its environment cannot be built, a cell cannot run on it,
or it fails for another reason (it raises, or only invariants other than the bisected
ones fail), so a release broken some other way never decides the answer.

Verdicts are judged raw: the known-deviation table (`numerics.judge.deviations`) exists to keep
today's expected failures from turning the matrix red, and would hide exactly the change
a bisect looks for, so ``xfail`` counts as the failure it is and ``xpass`` as a pass.

The search (`search`) is pure: it takes the ordered releases and a judge, so it is tested
on made-up version lists; `ReleaseJudge` is the judge that builds environments and runs
cells, with every (environment, cell) record cached so a second bisect costs seconds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from packaging.version import Version
from rich.console import Console

from numerics.cell import matrix
from numerics.cell.invariant_sets import held_by
from numerics.cell.spec import RunSpec
from numerics.run.runner import CANNOT
from numerics.show.results import SCHEMA
from numerics.versions import releases
from numerics.versions.cells import run_cells_in
from numerics.versions.environments import REPO_ROOT, Environment, build
from numerics.versions.resolve import BadPins, CannotBuild, Pin, check_published, parse_pins

Judgement = Literal["good", "bad", "skip"]
Judge = Callable[[str], Judgement]

FOUND = "found"
ONLY_SKIPPED_LEFT = "only skipped releases left"
ENDS_DO_NOT_DIFFER = "the ends do not differ"
END_NOT_JUDGED = "an end could not be judged"

CACHE_ROOT = REPO_ROOT / ".numerics" / "bisect-cache"
RAW_STATUS = {"xfail": "fail", "xpass": "pass"}  # what a known deviation turned each raw outcome into
CELL_TIMEOUT_S = 900.0
LOSS_CONTEXT = (2, 3)  # steps shown before and from the first diverging one


# -- the search -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Search:
    """Where the search ended. ``releases`` runs from the good end to the bad end, so the
    boundary is (``last_good``, ``first_bad``) in that order whichever way versions run."""

    releases: tuple[str, ...]
    outcome: str
    tried: tuple[tuple[str, Judgement], ...]
    last_good: str | None = None
    first_bad: str | None = None
    undecided: tuple[str, ...] = ()  # skipped releases between the two, any of which may be the first bad

    @property
    def skipped(self) -> tuple[str, ...]:
        return tuple(release for release, judgement in self.tried if judgement == "skip")


def search(releases_in_order: Sequence[str], judge: Judge) -> Search:
    """Bisect ``releases_in_order`` (good end first, bad end last, at least two) with ``judge``.

    Each release is judged at most once. Skipped releases are stepped around, nearest to
    the middle first; when only skipped ones separate a good and a bad release, the
    outcome says so and ``undecided`` names them, as ``git bisect`` does.
    """
    ordered = tuple(releases_in_order)
    tried: list[tuple[str, Judgement]] = []

    def ask(index: int) -> Judgement:
        judgement = judge(ordered[index])
        tried.append((ordered[index], judgement))
        return judgement

    good_end, bad_end = ask(0), ask(len(ordered) - 1)
    if good_end == "bad" or bad_end == "good":  # whatever the other end: there is no change to find
        return Search(ordered, ENDS_DO_NOT_DIFFER, tuple(tried))
    if "skip" in (good_end, bad_end):
        return Search(ordered, END_NOT_JUDGED, tuple(tried))
    good, bad, skipped = 0, len(ordered) - 1, set()
    while untested := [i for i in range(good + 1, bad) if i not in skipped]:
        middle = min(untested, key=lambda i: (abs(2 * i - good - bad), i))
        judgement = ask(middle)
        if judgement == "good":
            good = middle
        elif judgement == "bad":
            bad = middle
        else:
            skipped.add(middle)
    undecided = ordered[good + 1:bad]
    return Search(ordered, ONLY_SKIPPED_LEFT if undecided else FOUND, tuple(tried), ordered[good], ordered[bad],
                  undecided)


# -- what to bisect ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """A validated ``numerics bisect`` invocation."""

    package: str
    good: Pin
    bad: Pin
    pins: tuple[Pin, ...]  # the other pins every candidate carries
    specs: tuple[RunSpec, ...]
    invariant: str | None
    pre: bool
    selection: tuple[str, ...] = ()  # ``-- PYTEST_SELECTION``: run these tests instead of ``specs``

    @property
    def fixing(self) -> bool:
        """True when the good end is the newer one: the search is for the release that fixed it."""
        return Version(self.good.version) > Version(self.bad.version)

    def pins_for(self, release: str) -> tuple[Pin, ...]:
        return tuple(sorted((Pin(self.package, release), *self.pins)))


def make_request(package: str, good: str, bad: str, pins: list[str], pattern: str | None, invariant: str | None,
                 pre: bool, selection: tuple[str, ...] = ()) -> Request:
    """Check everything a person wrote before anything is built; raises `BadPins` (exit 2)."""
    [good_pin], [bad_pin] = parse_pins([f"{package}=={good}"]), parse_pins([f"{package}=={bad}"])
    if Version(good_pin.version) == Version(bad_pin.version):
        raise BadPins(f"--good and --bad are the same release ({good_pin}): nothing lies between them")
    others = parse_pins(pins)
    if any(pin.name == good_pin.name for pin in others):
        raise BadPins(f"--pin may not name {good_pin.name}, the package under bisect")
    if selection:
        if pattern is not None:
            raise BadPins("give --cells or a pytest selection after --, not both")
        check_published((good_pin, bad_pin, *others))
        return Request(good_pin.name, good_pin, bad_pin, others, (), invariant, pre, tuple(selection))
    specs = matrix.named_cells("full", pattern=pattern)
    if not specs:
        raise BadPins(f"no cell matches --cells {pattern!r} (a glob over the full matrix's cell ids "
                      f"and the fault cells' clean twins)")
    known = {"completes"}.union(*(held_by(spec.invariants) for spec in specs))
    if invariant is not None and invariant not in known:
        raise BadPins(f"--invariant {invariant!r} is not held by the selected cells; they hold {', '.join(sorted(known))}")
    check_published((good_pin, bad_pin, *others))  # last: the only check that asks the index
    return Request(good_pin.name, good_pin, bad_pin, others, tuple(specs), invariant, pre)


def releases_between(request: Request) -> list[str]:
    """The published releases from the good end to the bad end, both included, in that
    order; pre-releases between them only when asked for."""
    low, high = sorted((Version(request.good.version), Version(request.bad.version)))
    between = [v for v in releases.published_versions(request.package)
               if low <= v <= high and (request.pre or not v.is_prerelease or v in (low, high))]
    ordered = [str(v) for v in between]
    return ordered[::-1] if request.fixing else ordered


# -- judging a release ----------------------------------------------------------------------------
Target = frozenset[tuple[str, str]]  # the (cell id, invariant) pairs whose failure makes a release bad


def raw_failures(record: dict[str, Any]) -> set[str]:
    """The invariants that failed in a cell record, before any known deviation excused them."""
    return {invariant for invariant, status, _ in record["verdicts"] if RAW_STATUS.get(status, status) == "fail"}


def judge_records(records: list[dict[str, Any]], target: Target) -> tuple[Judgement, str]:
    """A release's judgement from its cells' records, and why, in a few words: bad where a target
    fails raw; skipped where it passes but something else failed that no known deviation explains
    (a crash or a wrong run can hide the target's failure); good otherwise. Another invariant's
    known deviation (xfail) is understood and hides nothing: at random, the ZeRO-3 gather race
    turns ``gathered_params_match`` yellow on a release that is good for a leak."""
    never_trained = [f"{record['cell']} {record['status']}" for record in records if record["status"] in CANNOT]
    if never_trained:
        return "skip", ", ".join(never_trained)
    failed = {(record["cell"], invariant) for record in records for invariant in raw_failures(record)}
    if failed & target:
        return "bad", f"{_names(failed & target)} fail"
    unexplained = {(record["cell"], invariant) for record in records for invariant, status, _ in record["verdicts"]
                   if status == "fail"}
    if unexplained:
        return "skip", f"fails for another reason: {_names(unexplained)}"
    return "good", "passes" + (f" (known deviations: {_names(failed)})" if failed else "")


def failed_at(records: list[dict[str, Any]], invariant: str | None) -> Target:
    """What the bisect looks for, read off the bad end: ``invariant`` in each selected cell,
    or by default every invariant that failed there."""
    if invariant is not None:
        return frozenset((record["cell"], invariant) for record in records)
    return frozenset((record["cell"], name) for record in records for name in raw_failures(record))


class RecordCache:
    """Cell records per (resolved environment, cell), as JSON files: the environment's
    directory name is the hash of its resolved set, the file name the cell id and a hash
    of the whole spec, so a changed cell is never answered from an old run."""

    def __init__(self, root: Path = CACHE_ROOT) -> None:
        self.root = root

    def path(self, environment: Environment, spec: RunSpec) -> Path:
        digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        return self.root / environment.path.name / f"{spec.cell_id}-{digest}.json"

    def get_named(self, environment: Environment, kind: str, key: Any) -> Any:
        """What was stored under ``key`` (any JSON) for ``environment``, e.g. a pytest selection's records."""
        path = self._named_path(environment, kind, key)
        return json.loads(path.read_text()) if path.exists() else None

    def put_named(self, environment: Environment, kind: str, key: Any, value: Any) -> None:
        self._write(self._named_path(environment, kind, key), value)

    def _named_path(self, environment: Environment, kind: str, key: Any) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return self.root / environment.path.name / f"{kind}-{digest}.json"

    def get(self, environment: Environment, spec: RunSpec) -> dict[str, Any] | None:
        path = self.path(environment, spec)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, environment: Environment, spec: RunSpec, record: dict[str, Any]) -> None:
        self._write(self.path(environment, spec), record)

    def _write(self, path: Path, record: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")  # two bisects may finish the same cell
        temporary.write_text(json.dumps(record))
        temporary.replace(path)


@dataclass
class Trial:
    """One release as tried: its judgement, why, its records, and where they came from."""

    release: str
    judgement: Judgement | None = None
    reason: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    environment: str | None = None
    cached: bool = False
    seconds: float = 0.0


class ReleaseJudge:
    """The judge `search` calls: builds the release's environment, runs (or recalls) the
    selected cells in it and judges their raw verdicts against ``target``."""

    def __init__(self, request: Request, console: Console, cache: RecordCache | None = None) -> None:
        self.request = request
        self.console = console
        self.cache = cache or RecordCache()
        self.trials: dict[str, Trial] = {}
        self.target: Target = frozenset()

    def __call__(self, release: str) -> Judgement:
        trial = self.run(release)
        if trial.judgement is None:
            trial.judgement, trial.reason = judge_records(trial.records, self.target)
            self.console.print(f"{self.request.package}=={release}: [bold]{trial.judgement}[/] ({trial.reason}; "
                               f"{'cached' if trial.cached else f'{trial.seconds:.0f}s'})", highlight=False)
        return trial.judgement

    def run(self, release: str) -> Trial:
        """The release's records, built and run once per bisect and cached across bisects;
        an environment that cannot be built, or cells that crash the run, make a skip."""
        if release in self.trials:
            return self.trials[release]
        trial = self.trials[release] = Trial(release)
        started = time.monotonic()
        pins = self.request.pins_for(release)
        with self.console.status(f"trying {' '.join(map(str, pins))}"):
            try:
                environment = build(pins, self.console)
                trial.environment = str(environment.path)
                trial.records, trial.cached = self._records(environment)
            except CannotBuild as err:
                trial.judgement, trial.reason = "skip", f"cannot build: {err.reason}"
            except RuntimeError as err:  # run_cells_in: the run died without records
                trial.judgement, trial.reason = "skip", f"cannot run: {str(err).splitlines()[0].rstrip(':')}"
        trial.seconds = time.monotonic() - started
        if trial.judgement == "skip":
            self.console.print(f"{self.request.package}=={release}: [bold]skip[/] ({trial.reason})", highlight=False)
        return trial

    def _records(self, environment: Environment) -> tuple[list[dict[str, Any]], bool]:
        """The selected cells' records in ``environment``; True when every one was cached."""
        if self.request.selection:
            return self._test_records(environment)
        specs = self.request.specs
        known = {spec.cell_id: self.cache.get(environment, spec) for spec in specs}
        missing = [spec for spec in specs if known[spec.cell_id] is None]
        if missing:
            for spec, record in zip(missing, run_cells_in(environment, missing, CELL_TIMEOUT_S)):
                self.cache.put(environment, spec, record)
                known[spec.cell_id] = record
        return [known[spec.cell_id] for spec in specs], not missing


    def _test_records(self, environment: Environment) -> tuple[list[dict[str, Any]], bool]:
        """The records of every cell the pytest selection ran in ``environment`` (its
        ``--numerics-report``), cached per selection; a selection that ran no cell cannot run."""
        cached = self.cache.get_named(environment, "pytest", self.request.selection)
        if cached is not None:
            return cached, True
        with tempfile.TemporaryDirectory() as report:
            command = [str(environment.python), "-m", "pytest", *self.request.selection, "-q", "-p", "no:cacheprovider",
                       "--numerics-report", report]
            done = subprocess.run(command, env=environment.variables(), cwd=str(REPO_ROOT), capture_output=True,
                                  text=True, timeout=CELL_TIMEOUT_S * 4)
            results = Path(report) / "results.json"
            if not results.exists():
                raise RuntimeError(f"the pytest selection ran no cell (exit {done.returncode}): "
                                   f"{(done.stdout.strip().splitlines() or [''])[-1]}")
            records = [_record_of_report(cell) for cell in json.loads(results.read_text())["cells"]]
        self.cache.put_named(environment, "pytest", self.request.selection, records)
        return records, False


def _record_of_report(cell: dict[str, Any]) -> dict[str, Any]:
    """A ``results.json`` cell as the record `run_cells_in` returns (the parts bisect reads)."""
    steps = (cell.get("trace") or {}).get("steps")
    return {"cell": cell["cell"], "status": cell["status"],
            "verdicts": [[v["invariant"], v["status"], v["message"]] for v in cell["verdicts"]],
            "losses": [float(s["loss"]) for s in steps] if steps else None}  # "nan" as written back to a float


def bisect(request: Request, console: Console, cache: RecordCache | None = None) -> tuple[Search, ReleaseJudge]:
    """Run the bad end first (the default target is what fails there), then search."""
    candidates = releases_between(request)
    console.print(f"{len(candidates)} releases of {request.package} from {candidates[0]} (good) to "
                  f"{candidates[-1]} (bad): {', '.join(candidates)}", highlight=False)
    judge = ReleaseJudge(request, console, cache)
    judge.target = failed_at(judge.run(request.bad.version).records, request.invariant)
    return search(candidates, judge), judge


# -- the answer ------------------------------------------------------------------------------
def boundary(request: Request, found: Search) -> list[tuple[str, str]]:
    """The two releases around the change, labelled and in the order they are printed. Going
    towards a fix, the search's good end is the newer one: its last good is the first fixed."""
    if request.fixing:
        return [("first fixed", found.last_good), ("last bad", found.first_bad)]
    return [("first bad", found.first_bad), ("last good", found.last_good)]


def summary(request: Request, found: Search, judge: ReleaseJudge) -> dict[str, Any]:
    """The result as data (``--json``); `summary_lines` prints the same."""
    data: dict[str, Any] = {
        "schema": SCHEMA, "kind": "bisect", "package": request.package, "good": request.good.version, "bad": request.bad.version,
        "direction": "first fixed" if request.fixing else "first bad", "pins": [str(p) for p in request.pins],
        "cells": [spec.cell_id for spec in request.specs], "selection": list(request.selection), "releases": list(found.releases),
        "outcome": found.outcome, "exit": 0 if found.outcome == FOUND else 1,
        "tried": [_trial_data(judge.trials[release]) for release, _ in found.tried],
        "skipped": list(found.skipped), "undecided": list(found.undecided),
    }
    if found.first_bad is None:
        return data
    red, green = judge.trials[found.first_bad], judge.trials[found.last_good]
    cell, invariants = _first_red_cell(red.records, judge.target)
    labelled = boundary(request, found)
    data.update(boundary=dict(labelled), cell=cell, invariants=invariants, losses=_side_by_side(green, red, cell),
                curves={side: {"release": trial.release, "losses": _losses(trial, cell)}
                        for side, trial in (("good", green), ("bad", red))},
                reproduce=[reproduce_command(request, release, cell) for _, release in labelled])
    return data


def summary_lines(data: dict[str, Any]) -> list[str]:
    """What the terminal shows last: the boundary on lines of its own, then the evidence."""
    if "cell" not in data:
        return [f"{data['outcome']}: " + "; ".join(f"{t['release']} {t['judgement']} ({t['reason']})"
                                                   for t in data["tried"])]
    package = data["package"]
    lines = []
    if data["outcome"] == ONLY_SKIPPED_LEFT:
        lines.append(f"{data['outcome']}: the {data['direction']} release is one of "
                     f"{', '.join(data['undecided'])} or the one named below")
    lines += [f"{label}: {package}=={release}" for label, release in data["boundary"].items()]
    lines += [f"invariant: {', '.join(data['invariants'])}", f"cell: {data['cell']}"]
    if data["skipped"]:
        lines.append(f"skipped: {', '.join(data['skipped'])}")
    losses = data["losses"]
    lines.append(f"loss by step (first diverging step: {losses['first_diverging_step']})")
    lines.append(f"{'step':>6}  {package + '==' + losses['green']:>22}  {package + '==' + losses['red']:>22}")
    lines += [f"{step:>6}  {_loss_text(a):>22}  {_loss_text(b):>22}" for step, a, b in losses["rows"]]
    lines.append("reproduce:")
    lines += [f"  {command}" for command in data["reproduce"]]
    return lines


def reproduce_command(request: Request, release: str, cell: str) -> str:
    if request.selection:
        pins = " ".join(map(str, request.pins_for(release)))
        return f"numerics env build {pins}   # then, with its PYTHONPATH: python -m pytest {' '.join(request.selection)}"
    pins = " ".join(f"--pin {pin}" for pin in request.pins_for(release))
    return f"numerics run {pins} --full --cells {cell}"


def _first_red_cell(records: list[dict[str, Any]], target: Target) -> tuple[str, list[str]]:
    """The first selected cell that fails a bisected invariant, and those invariants."""
    for record in records:
        failing = sorted(name for name in raw_failures(record) if (record["cell"], name) in target)
        if failing:
            return record["cell"], failing
    raise ValueError("the first bad release has no bisected failure")  # judge_records said it had


def _losses(trial: Trial, cell: str) -> list[float]:
    [losses] = [r["losses"] or [] for r in trial.records if r["cell"] == cell]
    return losses


def _side_by_side(green: Trial, red: Trial, cell: str) -> dict[str, Any]:
    """Both releases' losses around the first step they differ at (NaN equals NaN here)."""
    a, b = _losses(green, cell), _losses(red, cell)
    steps = max(len(a), len(b))
    diverging = next((s for s in range(steps) if not _same_loss(_at(a, s), _at(b, s))), None)
    before, after = LOSS_CONTEXT
    start = max(0, (diverging or 0) - before)
    end = min(steps, (diverging if diverging is not None else steps) + after)
    return {"green": green.release, "red": red.release, "first_diverging_step": diverging,
            "rows": [[s, _at(a, s), _at(b, s)] for s in range(start, end)]}


def _same_loss(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def _at(losses: list[float], step: int) -> float | None:
    return losses[step] if step < len(losses) else None


def _loss_text(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.6f}"


def _trial_data(trial: Trial) -> dict[str, Any]:
    return {"release": trial.release, "judgement": trial.judgement, "reason": trial.reason,
            "environment": trial.environment, "cached": trial.cached, "seconds": round(trial.seconds, 1)}


def _names(pairs: set[tuple[str, str]]) -> str:
    return ", ".join(sorted({invariant for _, invariant in pairs}))
