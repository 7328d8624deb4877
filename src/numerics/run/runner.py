"""Runs cells through rank pools and turns outcomes into verdicts.

Both the CLI (``numerics run``) and the pytest matrix go through `evaluate`,
so a cell means the same thing in the nightly table and in a test id. A judged cell
(`CellResult`) also gives its ``results.json`` record and its story here, so the run
layer needs nothing from the reports built on them (`numerics.show.report`).
"""
from __future__ import annotations

import signal
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

from numerics.cell.invariant_sets import held_by
from numerics.cell.spec import RunSpec
from numerics.judge import deviations
from numerics.judge.expected_na import judge_na
from numerics.judge.invariants import Verdict, check
from numerics.judge.trace import Trace
from numerics.run.launcher import CellOutcome, PoolStartError, RankPool
from numerics.run.platform import package_versions
from numerics.run.reference import reference_trace

CANNOT = ("cannot build", "cannot run")  # a cell that never trained: neither a pass nor a numerics failure
V = TypeVar("V")
# With GPUs, pytest-xdist worker w owns GPUs [4w, 4w + 4): the largest world size of the matrix,
# so a worker's ws2 pool never lands on another worker's ws4 block. Run GPUs / 4 workers.
GPUS_PER_WORKER = 4


@dataclass
class CellResult:
    outcome: CellOutcome
    verdicts: list[Verdict] = field(default_factory=list)
    # What the trace was judged against, kept for the report's curves: the reference run and,
    # with ``--golden``, the recorded golden.
    reference: Trace | None = None
    golden: Trace | None = None

    @property
    def spec(self) -> RunSpec:
        return self.outcome.spec

    @property
    def status(self) -> str:
        """``cannot build``/``cannot run`` if the cell never trained, ``fail`` if anything failed
        unexpectedly, else ``xfail`` if a known deviation showed, else ``pass``."""
        for status in CANNOT:
            if any(v.status == status for v in self.verdicts):
                return status
        if any(v.failed for v in self.verdicts):
            return "fail"
        return "xfail" if any(v.status == "xfail" for v in self.verdicts) else "pass"

    @property
    def first_failure(self) -> Verdict | None:
        return first_failing(self.verdicts, lambda v: v.status)

    def story(self) -> str:
        """Everything a person needs to read a failure without rerunning."""
        return story(cell_record(self))


def first_failing(verdicts: list[V], status: Callable[[V], str]) -> V | None:
    """The verdict a one-line summary names: the first failure (or cell that could not run),
    else the first known deviation; for `Verdict` objects and results.json records alike."""
    return next((v for v in verdicts if status(v) in ("fail", "xpass", *CANNOT)), None) \
        or next((v for v in verdicts if status(v) == "xfail"), None)


# -- a cell's results.json record (docs/results-schema.md), and its story ---------------------
def final_loss(result: CellResult) -> float | None:
    trace = result.outcome.trace
    return trace.steps[-1].loss if trace and trace.steps else None


def steps_per_s(result: CellResult) -> float | None:
    trace = result.outcome.trace
    return trace.meta.get("steps_per_s") if trace else None


def curves(trace: Trace | None) -> dict[str, list] | None:
    """The per-step numbers a plot needs from a reference or golden trace (not the whole trace)."""
    return {"loss": trace.values("loss"), "grad_norm": trace.values("grad_norm")} if trace else None


def cell_record(result: CellResult) -> dict:
    trace = result.outcome.trace
    first = result.first_failure
    return {
        "cell": result.spec.cell_id,
        "status": result.status,
        "spec": result.spec.to_dict(),
        "verdicts": [vars(v) for v in result.verdicts],
        "first_bad_step": first.step if first else None,
        "final_loss": final_loss(result),
        "steps_per_s": steps_per_s(result),
        "wall_s": result.outcome.wall_s,
        "error": result.outcome.error,
        "trace": trace.to_json() if trace else None,
        "reference": curves(result.reference),
        "golden": curves(result.golden),
    }


def story(cell: dict[str, Any]) -> str:
    """Everything a person needs to read a failure without rerunning, from its results.json record."""
    lines = [f"cell {cell['cell']}: {cell['status']}", f"spec: {cell['spec']}"]
    if cell.get("trace"):
        lines.append(f"meta: {cell['trace']['meta']}")
    lines += [f"  {v['status']:5s} {v['invariant']}: {v['message']}" + (f" [known: {known(v)}]" if v.get("reason") else "")
              for v in cell["verdicts"]]
    return "\n".join(lines)


def known(verdict: dict[str, Any]) -> str:
    """A verdict's known deviation: the entry's reason, then its signature beside what was measured."""
    text = verdict.get("reason", "")
    if verdict.get("signature"):
        text += f"; signature: {verdict['signature']}; measured: {deviations.measured_text(verdict.get('measured') or {})}"
    return text


def evaluate(outcome: CellOutcome) -> CellResult:
    """Check every invariant the cell declares and those every cell is held to, then apply the
    known-deviations table. A stage of judging that raises (the reference run, the n/a rules,
    the deviations table; an invariant fails on its own in `check`) fails this cell with its
    traceback, never the run: the cells after it still deserve their verdicts."""
    spec = outcome.spec
    if outcome.cannot is not None:
        status, why = outcome.cannot
        return CellResult(outcome, [Verdict("completes", status, f"[{spec.cell_id}] {why}")])
    if not outcome.ok:  # a crash a known deviation names (by its message) is expected too
        kind = "timed out" if outcome.timed_out else "failed"
        verdicts = [Verdict("completes", "fail", f"[{spec.cell_id}] {kind}:\n{outcome.error}")]
        return CellResult(outcome, _with_deviations(verdicts, spec.cell_id, spec.to_dict(), package_versions()))
    trace = outcome.trace
    try:
        reference = reference_trace(spec, trace)
    except Exception:
        return CellResult(outcome, [Verdict("completes", "pass"), _raised("reference", spec.cell_id)])
    names = held_by(spec.invariants)
    try:
        verdicts = [Verdict("completes", "pass")] + judge_na(check(trace, reference, names), spec)
    except Exception:
        verdicts = [Verdict("completes", "pass"), _raised("evaluate", spec.cell_id)]
    versions = trace.meta.get("versions") or package_versions()
    return CellResult(outcome, _with_deviations(verdicts, spec.cell_id, trace.spec, versions), reference)


def _raised(stage: str, cell_id: str) -> Verdict:
    """The failing verdict of a judging stage that raised, with its traceback; call inside ``except``."""
    return Verdict(stage, "fail", f"[{cell_id}] {stage} raised:\n{traceback.format_exc()}")


def _with_deviations(verdicts: list[Verdict], cell_id: str, fields: dict, versions: dict) -> list[Verdict]:
    """``verdicts`` with the known deviations applied; if the table raises, unexcused, plus its failure."""
    try:
        deviations.apply(verdicts, fields, versions)
    except Exception:
        verdicts.append(_raised("deviations", cell_id))
    return verdicts


INTERRUPTED_EXIT = 130  # what a run stopped by Ctrl-C or SIGTERM exits with, as a shell reports Ctrl-C


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (a CI job cancelled, a runner shutting down) end the run as Ctrl-C does:
    pools close, their ranks end, and the report is written with the cells that finished.
    Left alone where someone else already handles it, or off the main thread."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)


class PoolSet:
    """One `RankPool` per world size, started on first use and closed together."""

    def __init__(self, backend: str | None = None, worker: int = 0) -> None:
        self.backend = backend
        self.worker = worker  # pytest-xdist worker index: with GPUs, each worker takes its own block
        self.pools: dict[int, RankPool] = {}

    def pool(self, world_size: int) -> RankPool:
        """The pool of this world size, made on first use; one pool alive at a time: ranks of
        idle pools would compete for 2 cores."""
        if (pool := self.pools.get(world_size)) is None:
            self.close()
            pool = self.pools[world_size] = RankPool(world_size, self.backend, self.worker * GPUS_PER_WORKER)
        return pool

    def submit(self, spec: RunSpec) -> Callable[[], CellOutcome]:
        """Hand ``spec`` to its pool's ranks and return what waits for its outcome. A pool that
        cannot start fails this cell with every attempt's story; the next cell starts it again."""
        pool = self.pool(spec.world_size)
        try:
            pool.submit(spec)
        except PoolStartError as err:
            failed = CellOutcome(spec, error=str(err))
            return lambda: failed
        return pool.collect

    def run(self, spec: RunSpec) -> CellResult:
        return evaluate(self.submit(spec)())

    def run_all(self, specs: Iterable[RunSpec], on_submit: Callable[[RunSpec], None] | None = None) -> Iterator[CellResult]:
        """The cells' results in world-size order (each pool starts once), each cell judged while
        the ranks train the next: the parent's share of a cell (its reference run, the invariants,
        whatever the caller does with the result) then costs no wall time of its own."""
        collected: CellOutcome | None = None
        for spec in sorted(specs, key=lambda s: s.world_size):
            waiting = self.submit(spec)
            if on_submit:
                on_submit(spec)
            if collected is not None:
                yield evaluate(collected)
            collected = waiting()
        if collected is not None:
            yield evaluate(collected)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def __enter__(self) -> PoolSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
