"""Incident 4, "loss jump at an epoch boundary, eval silently missing": a multi-epoch run over a
finite dataset passes ``epoch_continuity`` and ``eval_present``; an optimizer reset or an lr schedule restart at the boundary
and an eval that stops after the first epoch each fail the invariant that targets them."""
import pytest

from numerics.cell.faults import FAULTS
from numerics.cell.matrix import fault_cell
from numerics.show.plugin import expect_pass

pytestmark = pytest.mark.multigpu

EPOCH_FAULTS = {"optimizer_reset_at_epoch": "epoch_continuity", "lr_schedule_restart_at_epoch": "epoch_continuity",
                "eval_skipped": "eval_present"}


def test_clean_epochs_pass(run_cell) -> None:
    expect_pass(run_cell(fault_cell(FAULTS["eval_skipped"], clean=True)))


@pytest.mark.parametrize(("name", "target"), list(EPOCH_FAULTS.items()))
def test_epoch_fault_is_caught(run_cell, name: str, target: str) -> None:
    result = run_cell(fault_cell(FAULTS[name]))
    fired = {v.invariant for v in result.verdicts if v.failed}
    assert target in fired and "finite" not in fired, result.story()
