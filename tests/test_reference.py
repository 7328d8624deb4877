"""The plain-torch reference: what it depends on, and how it lines up with a cell that skipped steps."""
import json
import math

import torch

from numerics.cell.spec import RunSpec
from numerics.judge.invariants import check
from numerics.judge.trace import StepRecord, Trace
from numerics.run.reference import ReferenceKey, applied_samples, partition_updates, reference_trace

SPEC = RunSpec(world_size=1, steps=6, seed=3)
WARMUP = {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": SPEC.lr,
                                                         "warmup_num_steps": 4, "warmup_type": "linear"}}}


def test_cells_differing_only_in_numeric_ds_extra_do_not_share_a_reference():
    clipped = SPEC.with_(ds_extra=json.dumps({"gradient_clipping": 0.01}))
    logged = SPEC.with_(ds_extra=json.dumps({"steps_per_print": 1}))
    assert ReferenceKey.of(clipped) != ReferenceKey.of(SPEC) == ReferenceKey.of(logged)


def test_reference_clips_and_schedules_as_deepspeed_would():
    sgd = SPEC.with_(optimizer="sgd", lr=0.1)
    plain = reference_trace(sgd)
    clipped = reference_trace(sgd.with_(ds_extra=json.dumps({"gradient_clipping": 0.01})))
    assert clipped.steps[0].grad_norm == plain.steps[0].grad_norm  # the norm is reported before clipping
    assert clipped.steps[0].update_norm < plain.steps[0].update_norm / 10
    warm = reference_trace(SPEC.with_(ds_extra=json.dumps(WARMUP)))
    assert [s.lr for s in warm.steps][:3] == [0.0, 0.0, SPEC.lr / 4]  # DeepSpeed's WarmupLR, stepped after each update


def cell_like(reference: Trace, skipped: set[int]) -> Trace:
    """A cell that trained exactly like the reference but skipped ``skipped`` (fp16 overflow):
    after a skip it holds the reference's weights of one step earlier."""
    applied = [s for s in range(SPEC.steps) if s not in skipped]
    behind = reference_trace(SPEC, Trace("x", SPEC.to_dict(), [StepRecord(s, 0.0, skipped=s in skipped) for s in range(SPEC.steps)]))
    steps = [StepRecord(s, behind.steps[applied.index(s)].loss if s in applied else 9.9, 1.0, skipped=s in skipped)
             for s in range(SPEC.steps)]
    for record in steps:
        if not record.skipped:
            record.grad_norm = behind.steps[applied.index(record.step)].grad_norm
    return Trace(SPEC.cell_id, SPEC.to_dict(), steps)


def test_a_cell_that_skipped_a_step_is_compared_with_a_reference_of_its_applied_steps():
    reference = reference_trace(SPEC)
    cell = cell_like(reference, skipped={2})
    assert applied_samples(SPEC, cell) == [range(4 * s, 4 * s + 4) for s in (0, 1, 3, 4, 5)]
    aligned = reference_trace(SPEC, cell)
    assert [v.status for v in check(cell, aligned, ("parity_loss", "parity_grad_norm"))] == ["pass", "pass"]
    # against the reference that never skipped, the same healthy cell would look one update ahead of itself
    assert check(cell, reference, ("parity_loss",))[0].status == "fail"


def test_slices_follow_zero3s_layout_and_a_zero3_reference_has_one_per_rank():
    """Rank r's slice of n elements over W ranks is [r * ceil(n / W), (r + 1) * ceil(n / W)), the last short."""
    slices = partition_updates({"p": torch.zeros(5)}, {"p": torch.arange(5.0)}, 2)
    assert slices == [{"p": math.sqrt(0 + 1 + 4)}, {"p": math.sqrt(9 + 16)}]
    zero3 = SPEC.with_(zero_stage=3, world_size=2, micro_batch=2)
    assert ReferenceKey.of(zero3).partitions == 2 and ReferenceKey.of(zero3.with_(zero_stage=2)).partitions == 1
    step = reference_trace(zero3).steps[0]
    assert len(step.partition_updates) == 2
    assert math.isclose(math.hypot(*(u for updates in step.partition_updates for u in updates.values())), step.update_norm)
