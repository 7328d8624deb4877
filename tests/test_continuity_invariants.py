"""resume_matches, epoch_continuity and eval_present on hand-made traces: each fails on a bad
one, naming the step, and passes on a good one (the end-to-end faults are in test_incident_*)."""
import numpy as np
import pytest

from numerics.judge.invariants import check
from numerics.judge.thresholds import TOLERANCES
from numerics.judge.trace import StepRecord, Trace

STEPS, EPOCH = 24, 8


def trace_of(losses, spec_steps=STEPS, **meta) -> Trace:
    steps = [StepRecord(step=i, loss=float(loss), grad_norm=1.0, param_checksums=[f"p{i}", f"p{i}"])
             for i, loss in enumerate(losses)]
    return Trace(cell="hand-made", spec={"steps": spec_steps, "dtype": "fp32"}, steps=steps, meta=meta)


def verdict(name, trace, reference=None):
    return check(trace, reference, (name,))[0]


SMOOTH = np.linspace(4.0, 3.0, STEPS)


def resumed(changed_at=None) -> Trace:
    trace = trace_of(SMOOTH, resume_step=STEPS // 2)
    trace.meta["uninterrupted"] = [{"loss": r.loss, "grad_norm": r.grad_norm, "param_checksum": r.param_checksums[0]}
                                   for r in trace.steps]
    if changed_at is not None:
        trace.steps[changed_at].param_checksums = ["other", "other"]
    return trace


def test_resume_matches_passes_bit_equal_and_fails_naming_the_first_step_that_differs():
    assert verdict("resume_matches", resumed()).status == "pass"
    bad = verdict("resume_matches", resumed(changed_at=15))
    assert bad.status == "fail" and bad.step == 15 and "resumed at step 12" in bad.message
    assert verdict("resume_matches", resumed(changed_at=3)).status == "pass"  # before the resume: not compared


def test_epoch_continuity_fails_on_a_jump_beyond_the_reference_at_a_boundary_only():
    reference = trace_of(SMOOTH, batches_per_epoch=EPOCH)
    jump = TOLERANCES["fp32"].epoch_jump * 1.5
    assert verdict("epoch_continuity", trace_of(SMOOTH, batches_per_epoch=EPOCH), reference).status == "pass"
    bad = verdict("epoch_continuity", trace_of(SMOOTH + jump * (np.arange(STEPS) > EPOCH), batches_per_epoch=EPOCH), reference)
    assert bad.status == "fail" and bad.step == EPOCH + 1 and "epoch 0" in bad.message
    assert bad.measured["excess"] == pytest.approx(jump)
    mid_epoch = trace_of(SMOOTH + jump * (np.arange(STEPS) > 12), batches_per_epoch=EPOCH)
    assert verdict("epoch_continuity", mid_epoch, reference).status == "pass"  # a noisy batch, not a boundary


def test_epoch_continuity_passes_a_rise_the_reference_shares():
    """The last batches of an epoch may be easier than the first of the next: the same rise in the
    reference, which replays the dataset, is the data's and not the loop's."""
    data_rise = SMOOTH + TOLERANCES["fp32"].epoch_jump * 3 * (np.arange(STEPS) % EPOCH == 1)
    reference = trace_of(data_rise, batches_per_epoch=EPOCH)
    assert verdict("epoch_continuity", trace_of(data_rise, batches_per_epoch=EPOCH), reference).status == "pass"
    assert verdict("epoch_continuity", trace_of(data_rise, batches_per_epoch=EPOCH)).status == "n/a"  # nothing to compare


def test_epoch_continuity_compares_no_boundary_with_a_skipped_step_and_says_so():
    trace, reference = (trace_of(SMOOTH, batches_per_epoch=EPOCH) for _ in range(2))
    for record in trace.steps:
        record.skipped = record.step % EPOCH == 0  # in the window before every boundary
    result = verdict("epoch_continuity", trace, reference)
    assert result.status == "n/a" and "no epoch boundary" in result.message


@pytest.mark.parametrize("missing, status", [((), "pass"), ((11,), "fail"), ((3, 7, 11, 15, 19, 23), "fail")])
def test_eval_present_fails_on_any_missing_scheduled_eval(missing, status):
    trace = trace_of(SMOOTH, eval_steps=list(range(3, STEPS, 4)))
    for record in trace.steps:
        if record.step in trace.meta["eval_steps"] and record.step not in missing:
            record.eval_loss = 3.5
    result = verdict("eval_present", trace)
    assert result.status == status
    if missing:
        assert result.step == missing[0] and f"{len(missing)} of 6 scheduled evals" in result.message
