"""An n/a passes a cell only where the cell's spec declares it (numerics.judge.expected_na)."""
from conftest import ZERO3, make_trace, zero3_trace

from numerics.cell.spec import RunSpec
from numerics.judge.expected_na import EXPECTED_NA, judge_na
from numerics.judge.invariants import Verdict, check


def test_declared_na_keeps_its_reason():
    spec = RunSpec(zero_stage=0, dtype="fp32")
    [judged] = judge_na(check(make_trace(reported=[None] * 16, spec=spec), None, ("grad_norm_agrees",)), spec)
    assert judged.status == "n/a" and "computes no global grad norm" in judged.message


def test_undeclared_na_fails_the_cell_saying_nothing_was_compared():
    spec = RunSpec(zero_stage=2, dtype="bf16")  # DeepSpeed reports a norm here: none recorded is a driver or release bug
    [judged] = judge_na(check(make_trace(reported=[None] * 16, spec=spec), None, ("grad_norm_agrees",)), spec)
    assert judged.status == "fail" and judged.failed
    assert spec.cell_id in judged.message and "nothing was compared" in judged.message


def test_other_verdicts_pass_through_unchanged():
    spec = RunSpec()
    verdicts = [Verdict("finite", "pass"), Verdict("parity_loss", "fail", "x", 3)]
    assert judge_na(verdicts, spec) == verdicts


def test_every_entry_names_a_known_invariant_and_real_spec_fields():
    from numerics.judge.invariants import INVARIANTS

    fields = RunSpec().to_dict()
    for entry in EXPECTED_NA:
        assert entry.invariant in INVARIANTS and set(entry.cell) <= set(fields) and entry.reason


def test_a_zero3_epochs_cell_declares_why_its_slices_are_not_compared():
    """Its 96 steps outrun the horizon of the per-step slice tolerances, so its ranks' slices are not
    compared with the reference; a ZeRO-3 cell held to parity that recorded none fails."""
    epochs = ZERO3.with_(driver="epochs", invariants=("finite", "replicas_agree"))
    [judged] = judge_na(check(zero3_trace(epochs), zero3_trace(), ("replicas_agree",)), epochs)
    assert judged.status == "n/a" and "outrun the 16-step horizon" in judged.message
    unrecorded = make_trace(spec=ZERO3)
    [judged] = judge_na(check(unrecorded, zero3_trace(), ("replicas_agree",)), ZERO3)
    assert judged.status == "fail" and "nothing was compared" in judged.message
