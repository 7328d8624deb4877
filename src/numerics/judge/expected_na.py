"""Where an invariant is expected not to apply to a cell, with the reason: the only n/a a cell
may pass with.

An invariant says n/a when the trace lacks what it compares (no reported grad norm, one rank,
no partitioned parameters). Counted as a pass, an n/a lets a cell go green with nothing
compared: a driver that stops recording a field, or a release that stops reporting one,
would silence its invariant on every cell. So `runner.evaluate` fails every n/a this table
does not declare for the cell, and the declared ones keep their reason in the report.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from numerics.cell.spec import RunSpec, matches
from numerics.judge.invariants import Verdict


@dataclass(frozen=True)
class ExpectedNA:
    invariant: str
    cell: dict[str, Any]  # RunSpec fields, as in deviations.py: a tuple means one of
    reason: str


EXPECTED_NA: tuple[ExpectedNA, ...] = (
    ExpectedNA("gathered_params_match", {"zero_stage": (0, 1, 2)},
               "below ZeRO-3 every rank holds whole parameters: nothing is gathered"),
    ExpectedNA("replicas_agree", {"world_size": 1}, "one rank: no replica to compare"),
    ExpectedNA("replicas_agree", {"zero_stage": 3, "driver": ("epochs", "trainer_epochs")},
               "ZeRO-3 ranks hold different slices, each compared with the reference's at every step, and an epochs "
               "cell's 96 steps at lr 3e-2 outrun the 16-step horizon of those tolerances: against its replaying "
               "reference the slices' updates drift by 2.2e-4 (> 2e-4) in fp32 and 0.068 (> 0.05) in bf16, and so do "
               "loss and grad norm (no parity invariant either; measured 2026-12-02)"),
    ExpectedNA("grad_norm_agrees", {"zero_stage": 0, "dtype": "fp32"},
               "DeepSpeed's ZeRO-0 fp32 engine computes no global grad norm (get_global_grad_norm() is None)"),
)


def expected_na(spec: dict[str, Any], invariant: str) -> ExpectedNA | None:
    return next((e for e in EXPECTED_NA if e.invariant == invariant and matches(spec, e.cell)), None)


def judge_na(verdicts: list[Verdict], spec: RunSpec) -> list[Verdict]:
    """``verdicts`` with each n/a the cell declares given its reason, and every other n/a turned
    into a failure that says nothing was compared."""
    judged = []
    for verdict in verdicts:
        if verdict.status == "n/a":
            declared = expected_na(spec.to_dict(), verdict.invariant)
            verdict = replace(verdict, message=f"{verdict.message} (expected: {declared.reason})") if declared else replace(
                verdict, status="fail", message=f"[{spec.cell_id}] nothing was compared ({verdict.message}), and the cell "
                "does not declare this invariant inapplicable (numerics.judge.expected_na): a green cell needs evidence")
        judged.append(verdict)
    return judged
