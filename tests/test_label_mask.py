"""check_label_mask on good and bad batches, and the two invariants of the overfit incident
on hand-made traces: fast, no training."""
import copy

import pytest
import torch

from numerics.cell.label_mask import IGNORE, check_label_mask, mask_labels
from numerics.cell.spec import RunSpec
from numerics.cell.workloads import TAGS, OverfitPair, get_workload
from numerics.judge.invariants import check
from numerics.judge.trace import StepRecord, Trace

OVERFIT = RunSpec(workload="overfit", world_size=2, micro_batch=1)
PADDED = RunSpec(workload="padded", world_size=1, micro_batch=8)


def batch_and_mask(spec: RunSpec) -> tuple[dict, torch.Tensor]:
    workload = get_workload(spec.workload)
    return workload.step_batch(spec, 0), workload.response_mask(spec, 0)


@pytest.mark.parametrize("spec", [OVERFIT, PADDED], ids=["overfit", "padded"])
def test_workload_batches_pass(spec):
    assert check_label_mask(*batch_and_mask(spec)) == []


def test_leaked_special_token_is_named():
    batch, mask = batch_and_mask(OVERFIT.with_(fault="label_mask_leak"))
    problems = check_label_mask(batch, mask)
    assert any("outside the response" in p and f"token {TAGS[0]}" in p for p in problems), problems
    assert any("12 supervised targets, the response mask says 10" in p for p in problems), problems


def test_supervised_padding_is_caught():
    batch, mask = batch_and_mask(PADDED)
    batch = dict(batch, labels=batch["input_ids"])  # the plain-loop bug: labels = input_ids, pads included
    assert any("outside the response" in p for p in check_label_mask(batch, mask))


def test_dropped_response_token_is_caught():
    batch, mask = batch_and_mask(OVERFIT)
    labels = batch["labels"].clone()
    labels[0, mask[0].nonzero()[-1]] = IGNORE
    problems = check_label_mask(dict(batch, labels=labels), mask)
    assert any("not supervised with their own token" in p for p in problems), problems


def test_mask_over_padding_and_shape_mismatch():
    batch, mask = batch_and_mask(PADDED)
    wide = torch.ones_like(mask)
    assert any("padding positions" in p for p in check_label_mask(dict(batch, labels=mask_labels(batch["input_ids"], wide)), wide))
    assert "shapes differ" in check_label_mask(batch, mask[:, 1:])[0]


def overfit_trace(losses, supervised):
    steps = [StepRecord(step=i, loss=loss, supervised_tokens=supervised) for i, loss in enumerate(losses)]
    return Trace(cell=OVERFIT.cell_id, spec=OVERFIT.with_(steps=len(losses)).to_dict(), steps=steps)


def test_overfits_and_supervised_tokens_invariants():
    good = overfit_trace([4.0, 0.5, 0.03, 0.02], supervised=10)
    assert [v.status for v in check(good, None, ("overfits", "supervised_tokens"))] == ["pass", "pass"]
    floor = OverfitPair.leak_floor(OVERFIT.global_batch)
    bad = overfit_trace([4.0, 0.5, floor + 0.01, floor + 0.005], supervised=12)
    overfits, supervised = check(bad, None, ("overfits", "supervised_tokens"))
    assert overfits.status == "fail" and "not below" in overfits.message
    assert supervised.status == "fail" and supervised.step == 0 and "says 10" in supervised.message


def test_supervised_tokens_is_na_without_a_mask():
    trace = copy.deepcopy(overfit_trace([1.0], 10))
    trace.spec = RunSpec(steps=1).to_dict()
    assert check(trace, None, ("supervised_tokens",))[0].status == "n/a"
