"""Incident 3, "cannot overfit two samples": the clean loop memorises the two ``overfit``
samples; a label mask that leaks an unpredictable special token floors the loss at
ln 2 / (supervised tokens per sample), and ``overfits`` and ``supervised_tokens`` say so."""
import statistics

import pytest

from numerics.cell.faults import FAULTS
from numerics.cell.matrix import fault_cell
from numerics.cell.workloads import OverfitPair
from numerics.show.plugin import expect_pass

pytestmark = pytest.mark.multigpu

LEAK = FAULTS["label_mask_leak"]


def final_loss(result) -> float:
    return statistics.fmean(result.outcome.trace.values("loss")[-2:])


def test_two_samples_overfit(run_cell):
    result = run_cell(fault_cell(LEAK, clean=True))
    expect_pass(result)
    print(f"clean final loss {final_loss(result):.4f}")


def test_label_mask_leak_floors_the_loss(run_cell):
    result = run_cell(fault_cell(LEAK))
    fired = {v.invariant for v in result.verdicts if v.failed}
    assert {"overfits", "supervised_tokens"} <= fired, result.story()
    assert "finite" not in fired, result.story()
    floor = OverfitPair.leak_floor(result.spec.global_batch)
    assert final_loss(result) >= floor - 1e-3, f"below the exact floor {floor:.4f}: the floor argument is wrong\n{result.story()}"
    print(f"leaky final loss {final_loss(result):.4f}, floor ln2/6 = {floor:.4f}")
