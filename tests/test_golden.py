"""Golden traces: an identical trace matches, a perturbed one moves at the step and metric
perturbed, a missing golden is reported (never a pass), and updating is explicit."""
import dataclasses
import math
from types import SimpleNamespace

import pytest

from numerics.cell import matrix
from numerics.judge import golden
from numerics.judge.trace import StepRecord, Trace

SPEC = {"dtype": "fp32", "comm_dtype": None}


def make_trace(cell: str = "zero1-fp32-ws2", spec: dict = SPEC, steps: int = 8) -> Trace:
    records = [StepRecord(step=s, loss=4.0 - 0.1 * s, grad_norm=1.0 + 0.01 * s, grad_norm_reported=1.0 + 0.01 * s)
               for s in range(steps)]
    return Trace(cell=cell, spec=dict(spec), steps=records, meta={"device": "cpu", "backend": "gloo", "world_size": 2,
                                                                  "versions": {"deepspeed": "0.19.8"}})


def perturbed(trace: Trace, step: int, metric: str, factor: float) -> Trace:
    steps = [dataclasses.replace(s, **{metric: getattr(s, metric) * factor}) if s.step >= step else s for s in trace.steps]
    return dataclasses.replace(trace, steps=steps)


def result_of(trace: Trace, status: str = "pass") -> SimpleNamespace:
    return SimpleNamespace(spec=SimpleNamespace(cell_id=trace.cell), outcome=SimpleNamespace(trace=trace), status=status)


def test_an_identical_trace_matches_its_golden(tmp_path):
    golden.save(make_trace(), tmp_path)
    assert golden.verdict(make_trace(), tmp_path).status == "pass"


def test_a_perturbed_trace_moves_at_the_step_and_metric_perturbed(tmp_path):
    golden.save(make_trace(), tmp_path)
    verdict = golden.verdict(perturbed(make_trace(), 5, "grad_norm", 1.001), tmp_path)  # 1e-3 > fp32's 5e-5
    assert verdict.status == "fail" and verdict.step == 5
    assert "grad_norm moved at step 5" in verdict.message and "golden from cpu/gloo/ws2" in verdict.message


def test_noise_inside_the_dtype_tolerance_does_not_move():
    assert golden.compare(perturbed(make_trace(), 0, "loss", 1 + 1e-6), make_trace()) is None


def test_a_shorter_run_or_a_nan_moves():
    short = dataclasses.replace(make_trace(), steps=make_trace().steps[:6])
    assert golden.compare(short, make_trace()).step == 6
    nan = perturbed(make_trace(), 3, "loss", math.nan)
    moved = golden.compare(nan, make_trace())
    assert (moved.step, moved.metric) == (3, "loss")


def test_a_missing_golden_is_reported_never_passed(tmp_path):
    verdict = golden.verdict(make_trace(), tmp_path)
    assert verdict.status == "n/a" and "no golden" in verdict.message and "numerics golden record" in verdict.message


def test_recording_over_a_golden_needs_update_and_says_what_moved(tmp_path):
    assert golden.record([result_of(make_trace())], tmp_path, update=False) == ["zero1-fp32-ws2: recorded (new)"]
    moved = perturbed(make_trace(), 2, "loss", 1.01)
    [kept] = golden.record([result_of(moved)], tmp_path, update=False)
    assert "kept the existing golden (moved: loss moved at step 2" in kept
    assert golden.load(tmp_path, "zero1-fp32-ws2")[0].steps[2].loss == make_trace().steps[2].loss
    [updated] = golden.record([result_of(moved)], tmp_path, update=True)
    assert updated.startswith("zero1-fp32-ws2: recorded (moved: loss moved at step 2")
    assert golden.verdict(moved, tmp_path).status == "pass"


def test_a_failing_cell_is_never_recorded(tmp_path):
    [line] = golden.record([result_of(make_trace(), status="fail")], tmp_path, update=False)
    assert "not recorded" in line and not (tmp_path / "zero1-fp32-ws2.json").exists()


@pytest.mark.multigpu
def test_a_changed_communication_dtype_moves_at_the_first_reduced_step(run_cell, tmp_path):
    """The golden of a ZeRO-1 fp32 run with fp32 communication, and the same cell once its
    config says bf16: the step-0 loss is computed before any communication and stays
    bit-equal, the step-0 gradient has been through the bf16 reduction and moves."""
    [cell] = matrix.cells("full", pattern="zero1-fp32-comm_fp32-ws2")
    recorded = run_cell(cell)
    assert golden.record([recorded], tmp_path, update=False) == [f"{cell.cell_id}: recorded (new)"]
    changed = run_cell(cell.with_(comm_dtype="bf16")).outcome.trace
    changed.cell = cell.cell_id  # the same cell, its config edited
    verdict = golden.verdict(changed, tmp_path)
    assert verdict.status == "fail" and verdict.step == 0 and "grad_norm moved at step 0" in verdict.message, verdict
    assert changed.steps[0].loss == recorded.outcome.trace.steps[0].loss
    assert golden.verdict(run_cell(cell).outcome.trace, tmp_path).status == "pass"  # and fp32 reruns bit for bit
