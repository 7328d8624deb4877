"""``logged_matches``: what a Trainer logs, what its user reads, must equal what was measured at
the same step. Hand-made traces for the invariant's logic; one real run for the fault that logs
the loss times GA while training right."""
from __future__ import annotations

import pytest

from numerics.cell.faults import FAULTS
from numerics.cell.matrix import fault_cell
from numerics.cell.spec import RunSpec
from numerics.judge.invariants import assert_logged_matches
from numerics.judge.trace import StepRecord, Trace

SPEC = RunSpec(driver="trainer", zero_stage=1, dtype="bf16", grad_accum=2, micro_batch=2, steps=4)


def trainer_trace(unlogged: dict[str, str] | None = None, spec: RunSpec = SPEC, **changed: float) -> Trace:
    """A 4-step Trainer trace whose logs equal its measurements, but for the ``changed`` figures at step 2."""
    steps = []
    for step in range(spec.steps):
        record = StepRecord(step=step, loss=4.0 - 0.1 * step, grad_norm=1.0 + 0.1 * step, lr=3e-3)
        record.extra["logged"] = {"loss": record.loss, "grad_norm": record.grad_norm, "learning_rate": record.lr}
        if step == 2:
            record.extra["logged"].update(changed)
        steps.append(record)
    return Trace(cell=spec.cell_id, spec=spec.to_dict(), steps=steps, meta={"unlogged": unlogged or {}})


def test_logs_equal_to_measurements_pass() -> None:
    verdict = assert_logged_matches(trainer_trace(), None)
    assert verdict.status == "pass", verdict.message


def test_loss_logged_times_ga_fails_at_its_step() -> None:
    verdict = assert_logged_matches(trainer_trace(loss=2 * 3.8), None)
    assert verdict.status == "fail" and verdict.step == 2, verdict.message
    assert "logged loss 7.6, measured 3.8" in verdict.message, verdict.message


def test_a_wrong_learning_rate_fails() -> None:
    verdict = assert_logged_matches(trainer_trace(learning_rate=3e-4), None)
    assert verdict.status == "fail" and "learning_rate" in verdict.message, verdict.message


def test_bf16_rounding_of_the_logged_loss_passes() -> None:
    verdict = assert_logged_matches(trainer_trace(loss=3.8 * (1 + 1e-4)), None)
    assert verdict.status == "pass", verdict.message


def test_a_loss_logged_to_four_decimals_passes_in_fp32() -> None:
    """transformers 4.47 logs round(loss, 4)."""
    verdict = assert_logged_matches(trainer_trace(spec=SPEC.with_(dtype="fp32"), loss=round(3.8 + 4.6e-5, 4)), None)
    assert verdict.status == "pass", verdict.message


def test_a_figure_missing_fails_unless_the_cell_declares_why() -> None:
    missing = trainer_trace()
    for record in missing.steps:
        del record.extra["logged"]["grad_norm"]
    verdict = assert_logged_matches(missing, None)
    assert verdict.status == "fail" and "logged no grad_norm" in verdict.message, verdict.message
    missing.meta["unlogged"] = {"grad_norm": "the engine computes none"}
    verdict = assert_logged_matches(missing, None)
    assert verdict.status == "pass" and "the engine computes none" in verdict.message, verdict.message


def test_not_a_trainer_cell_is_na() -> None:
    trace = trainer_trace()
    del trace.meta["unlogged"]
    assert assert_logged_matches(trace, None).status == "n/a"


@pytest.mark.multigpu
def test_trainer_logging_the_loss_times_ga_is_caught(run_cell) -> None:
    """The run trains right; only what its user reads is wrong, so only ``logged_matches`` fires."""
    faulty = run_cell(fault_cell(FAULTS["logged_loss_times_ga"]))
    assert {v.invariant for v in faulty.verdicts if v.failed} == {"logged_matches"}, faulty.story()
    clean = run_cell(fault_cell(FAULTS["logged_loss_times_ga"], clean=True))
    assert clean.status == "pass", clean.story()
