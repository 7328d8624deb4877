"""Incident 5, "resume changes training": a run resumed from a DeepSpeed checkpoint must train
exactly as the same run uninterrupted, at every ZeRO stage; resuming without the optimizer
state (Adam moments reset) must be caught by ``resume_matches``, not merely by ``finite``."""
import pytest

from numerics.cell.faults import FAULTS
from numerics.cell.matrix import fault_cell
from numerics.show.plugin import expect_pass

pytestmark = pytest.mark.multigpu

FAULT = FAULTS["resume_without_optimizer_state"]


@pytest.mark.parametrize(("stage", "dtype"), [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_resume_matches_uninterrupted(run_cell, stage: int, dtype: str) -> None:
    expect_pass(run_cell(fault_cell(FAULT, clean=True).with_(zero_stage=stage, dtype=dtype)))


def test_resume_without_optimizer_state_is_caught(run_cell) -> None:
    result = run_cell(fault_cell(FAULT))
    fired = {v.invariant for v in result.verdicts if v.failed}
    assert "resume_matches" in fired and "finite" not in fired, result.story()
