"""Runs cells through rank pools and turns outcomes into verdicts.

Both the CLI (``numerics run``) and the pytest matrix go through `evaluate`,
so a cell means the same thing in the nightly table and in a test id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from numerics import deviations
from numerics.expected_na import judge_na
from numerics.invariants import Verdict, check
from numerics.launcher import CellOutcome, RankPool
from numerics.platform import package_versions
from numerics.reference import reference_trace
from numerics.spec import RunSpec


CANNOT = ("cannot build", "cannot run")  # a cell that never trained: neither a pass nor a numerics failure


@dataclass
class CellResult:
    outcome: CellOutcome
    verdicts: list[Verdict] = field(default_factory=list)

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
        return next((v for v in self.verdicts if v.failed or v.status in CANNOT), None) \
            or next((v for v in self.verdicts if v.status == "xfail"), None)

    def story(self) -> str:
        """Everything a person needs to read a failure without rerunning."""
        lines = [f"cell {self.spec.cell_id}: {self.status}", f"spec: {self.spec.to_dict()}"]
        if self.outcome.trace is not None:
            lines.append(f"meta: {self.outcome.trace.meta}")
        lines += [f"  {v.status:5s} {v.invariant}: {v.message}" + (f" [known: {v.reason}]" if v.reason else "")
                  for v in self.verdicts]
        return "\n".join(lines)


def evaluate(outcome: CellOutcome) -> CellResult:
    """Check every invariant the cell declares, then apply the known-deviations table."""
    if outcome.cannot is not None:
        status, why = outcome.cannot
        return CellResult(outcome, [Verdict("completes", status, f"[{outcome.spec.cell_id}] {why}")])
    if not outcome.ok:  # a crash a known deviation names (by its message) is expected too
        kind = "timed out" if outcome.timed_out else "raised"
        verdicts = [Verdict("completes", "fail", f"[{outcome.spec.cell_id}] {kind}:\n{outcome.error}")]
        deviations.apply(verdicts, outcome.spec.to_dict(), package_versions())
        return CellResult(outcome, verdicts)
    trace = outcome.trace
    checked = check(trace, reference_trace(outcome.spec, trace), outcome.spec.invariants)
    verdicts = [Verdict("completes", "pass")] + judge_na(checked, outcome.spec)
    deviations.apply(verdicts, trace.spec, trace.meta.get("versions") or package_versions())
    return CellResult(outcome, verdicts)


class PoolSet:
    """One `RankPool` per world size, started on first use and closed together."""

    def __init__(self, backend: str | None = None, worker: int = 0) -> None:
        self.backend = backend
        self.worker = worker  # pytest-xdist worker index: with GPUs, each worker takes its own block
        self.pools: dict[int, RankPool] = {}

    def run(self, spec: RunSpec) -> CellResult:
        pool = self.pools.get(spec.world_size)
        if pool is None:
            self.close()  # one pool alive at a time: ranks of idle pools would compete for 2 cores
            pool = self.pools[spec.world_size] = RankPool(spec.world_size, self.backend, self.worker * spec.world_size)
        return evaluate(pool.run(spec))

    def run_all(self, specs: Iterable[RunSpec], on_result: Callable[[CellResult], None] | None = None) -> list[CellResult]:
        results = []
        for spec in sorted(specs, key=lambda s: s.world_size):  # each pool starts once
            result = self.run(spec)
            results.append(result)
            if on_result:
                on_result(result)
        return results

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def __enter__(self) -> PoolSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
