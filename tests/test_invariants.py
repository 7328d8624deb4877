"""Every invariant passes on a healthy trace and fails, naming the step, on a hand-made bad one."""
import copy
import math

import numpy as np
import pytest
from conftest import GOOD_LOSSES, SPEC, STEPS, ZERO3, make_trace, zero3_trace

from numerics.cell.invariant_sets import DEFAULT_INVARIANTS, INVARIANT_NAMES
from numerics.judge.invariants import INVARIANTS, PER_STEP, check, invariant
from numerics.judge.thresholds import TOLERANCES, tolerance


def verdict(name, trace, reference="self"):
    reference = copy.deepcopy(make_trace()) if reference == "self" else reference
    return check(trace, reference, (name,))[0]


def with_step(values, step, value):
    values = list(values)
    values[step] = value
    return values


GOOD_GRADS = make_trace().values("grad_norm")


@pytest.mark.parametrize("name", DEFAULT_INVARIANTS)
def test_good_trace_passes_every_invariant(name):
    assert verdict(name, make_trace()).status == "pass"


@pytest.mark.parametrize("name, trace, step", [
    ("finite", make_trace(losses=with_step(GOOD_LOSSES, 7, math.nan)), 7),
    ("no_collapse", make_trace(losses=[*GOOD_LOSSES[:10], *[0.0] * 6]), 10),
    ("no_collapse", make_trace(grad_norms=with_step(GOOD_GRADS, 8, 0.0)), 8),
    ("no_spike", make_trace(grad_norms=with_step(GOOD_GRADS, 9, 1000 * GOOD_GRADS[9])), 9),
    ("learns", make_trace(losses=[4.1] * STEPS), None),
    ("parity_loss", make_trace(losses=[x * (1.01 if i >= 5 else 1) for i, x in enumerate(GOOD_LOSSES)]), 5),
    ("parity_grad_norm", make_trace(grad_norms=[x * (1.5 if i >= 5 else 1) for i, x in enumerate(GOOD_GRADS)]), 5),
    ("replicas_agree", make_trace(), 3),
    ("init_matches", make_trace(init_checksum="other"), 0),
    ("step0_grads", make_trace(step0_grads={"w": np.ones((3, 4)) * 1.1, "b": np.full(5, 0.5)}), 0),
    ("grad_norm_agrees", make_trace(reported=[2 * g for g in GOOD_GRADS]), 0),
    ("gathered_params_match", make_trace(), 6),
])
def test_bad_trace_fails_naming_the_step(name, trace, step):
    if name == "replicas_agree":
        trace.steps[3].param_checksums = ["sum3", "drifted"]
    if name == "gathered_params_match":  # one rank's view of the weights is a stale buffer at step 6
        trace.steps[6].gathered_errors = [0.0, 3.0e38]
    result = verdict(name, trace)
    assert result.status == "fail" and result.failed
    assert result.step == step
    assert f"[{SPEC.cell_id}]" in result.message
    if step is not None:
        assert f"at step {step}:" in result.message


def test_zero3_rank_that_missed_an_update_fails_naming_rank_step_and_parameter():
    result = verdict("replicas_agree", zero3_trace(scale=lambda step, rank: 0.0 if (step, rank) == (8, 1) else 1.0),
                     zero3_trace())
    assert result.status == "fail" and result.step == 8, result.message
    assert "rank 1's slices of the fp32 master moved by 0 " in result.message
    assert "the reference's same slices by 0.4" in result.message and "most off: w 0 vs 0.4" in result.message


@pytest.mark.parametrize("dtype, scale, status", [
    ("fp32", 1 + 1e-5, "pass"), ("fp32", 1 + 1e-3, "fail"),
    ("bf16", 1.02, "pass"), ("bf16", 0.9, "fail"), ("bf16", 1.2, "fail"),
])
def test_zero3_slice_updates_are_held_to_the_dtypes_tolerance(dtype, scale, status):
    spec = ZERO3.with_(dtype=dtype)
    trace = zero3_trace(spec, lambda step, rank: scale if (step, rank) == (5, 0) else 1.0)
    result = verdict("replicas_agree", trace, zero3_trace(spec))
    assert result.status == status, result.message
    assert result.step == (5 if status == "fail" else None)


def test_zero3_checksums_that_agree_are_not_enough():
    """At ZeRO-3 equal checksums hold by construction: without the ranks' slices nothing is compared."""
    trace = zero3_trace()
    for record in trace.steps:
        record.partition_updates = []
    assert verdict("replicas_agree", trace, zero3_trace()).status == "n/a"
    assert verdict("replicas_agree", zero3_trace(), reference=None).status == "n/a"


def test_zero3_checksums_that_differ_still_fail():
    trace = zero3_trace()
    trace.steps[3].param_checksums = ["sum3", "drifted"]
    result = verdict("replicas_agree", trace, zero3_trace())
    assert result.status == "fail" and result.step == 3 and "checksums differ" in result.message


def test_finite_ignores_inf_grad_norm_of_a_skipped_fp16_step():
    trace = make_trace(grad_norms=with_step(GOOD_GRADS, 4, math.inf))
    trace.steps[4].skipped = True
    assert verdict("finite", trace).status == "pass"


@pytest.mark.parametrize("dtype, comm_dtype, rtol, status", [
    ("fp32", None, 1e-6, "pass"),
    ("fp32", None, 1e-3, "fail"),
    ("bf16", None, 1e-3, "pass"),
    ("fp32", "bf16", 1e-3, "pass"),  # the comm dtype coarsens the cell's tolerance
])
def test_parity_tolerance_follows_the_coarser_dtype(dtype, comm_dtype, rtol, status):
    spec = SPEC.with_(dtype=dtype, comm_dtype=comm_dtype)
    trace = make_trace(losses=[x * (1 + rtol) for x in GOOD_LOSSES], spec=spec)
    assert verdict("parity_loss", trace).status == status


@pytest.mark.parametrize("dtype, scale, status", [
    ("fp32", 1.0 + 1e-7, "pass"), ("fp32", 1.0 + 5e-6, "fail"),
    ("bf16", 1.0 + 1e-3, "pass"), ("bf16", 1.01, "fail"),
])
def test_step0_grads_sees_a_uniform_scale_far_below_the_per_parameter_bound(dtype, scale, status):
    spec = SPEC.with_(dtype=dtype)
    reference = make_trace(spec=spec)
    rng = np.random.default_rng(0)  # rounding-like noise, orthogonal on average: 1e-2 relative L2 in bf16
    noise = 1e-2 if dtype == "bf16" else 0.0
    grads = {n: g * scale + noise * np.linalg.norm(g) / np.sqrt(g.size) * rng.standard_normal(g.shape)
             for n, g in reference.step0_grads.items()}
    result = verdict("step0_grads", make_trace(spec=spec, step0_grads=grads), reference)
    assert result.status == status, result.message
    if status == "fail":  # every gradient within its per-parameter bound: only the scale shows
        assert "along its direction" in result.message and result.step == 0


@pytest.mark.parametrize("name", ["parity_loss", "parity_grad_norm", "init_matches", "step0_grads"])
def test_reference_invariants_are_na_without_a_reference(name):
    assert verdict(name, make_trace(), reference=None).status == "n/a"


@pytest.mark.parametrize("name, trace", [
    ("grad_norm_agrees", make_trace(reported=[None] * STEPS)),
    ("replicas_agree", make_trace(checksums=1)),
    ("gathered_params_match", make_trace(gathered=0)),
    ("no_collapse", make_trace(entropy_rate=None, entropy_floor=None)),
    ("learns", make_trace(losses=GOOD_LOSSES[:5], spec=SPEC.with_(steps=5))),
])
def test_missing_data_gives_na_never_pass(name, trace):
    assert verdict(name, trace).status == "n/a"


@pytest.mark.parametrize("name", sorted(PER_STEP & set(DEFAULT_INVARIANTS)))
def test_a_trace_shorter_than_the_cell_fails_every_per_step_invariant(name):
    result = verdict(name, make_trace(losses=GOOD_LOSSES[:2]))
    assert result.status == "fail" and "the trace has 2 steps, the cell asks for 16" in result.message


def test_parity_needs_applied_steps_not_skipped_ones():
    trace = make_trace(spec=SPEC.with_(dtype="fp16"))
    for record in trace.steps[4:]:
        record.skipped = True  # a loss scale stuck overflowing: 4 updates in 16 steps
    result = verdict("parity_loss", trace)
    assert result.status == "fail" and "only 4 of 16 steps applied an update" in result.message
    for record in trace.steps[4:13]:
        record.skipped = False  # 13 of 16 applied: enough
    assert verdict("parity_loss", trace).status == "pass"


@pytest.mark.parametrize("dtype, comm_dtype, expected", [
    ("fp32", None, "fp32"), ("fp32", "bf16", "bf16"), ("bf16", "fp32", "bf16"),
    ("fp16", "bf16", "bf16"), ("fp32", "fp16", "fp16"),
])
def test_tolerance_is_the_coarser_of_dtype_and_comm_dtype(dtype, comm_dtype, expected):
    assert tolerance(dtype, comm_dtype) is TOLERANCES[expected]


def test_spike_after_vanished_gradients_is_a_verdict_not_a_crash():
    assert verdict("no_spike", make_trace(grad_norms=[0.0] * 4 + [1.0] * 12)).status == "fail"


def test_check_rejects_unknown_invariants():
    with pytest.raises(KeyError, match="no_such"):
        check(make_trace(), None, ("finite", "no_such"))


def test_the_judge_checks_exactly_the_names_a_cell_may_declare():
    """A RunSpec validates its invariants against the names as data (cell/invariant_sets.py),
    so every name there needs its check here, and no check may go by a name not listed."""
    assert sorted(INVARIANTS) == sorted(INVARIANT_NAMES)
    with pytest.raises(ValueError, match="INVARIANT_NAMES"):
        invariant("vibes")


def test_gathered_params_match_fails_on_nan():
    trace = make_trace()
    trace.steps[2].gathered_errors = [math.nan, 0.0]
    assert verdict("gathered_params_match", trace).status == "fail"


# A loss that falls 4.1 -> 0.004 (an overfit cell run long), and a reference it differs from by the
# absolute rounding measured there (<= 4.3e-7, thresholds.near_zero_fraction): 1e-4 relative at the
# end, over both fp32 bounds, yet rounding. A 1 % error at the last step is no rounding.
FALLING = [4.1 * 0.63 ** i for i in range(STEPS)]


@pytest.mark.parametrize("name, field", [("parity_loss", "losses"), ("parity_grad_norm", "grad_norms")])
@pytest.mark.parametrize("moved, status", [
    (lambda i, x: x + 4e-7, "pass"),
    (lambda i, x: x * (1.01 if i == STEPS - 1 else 1.0), "fail"),
])
def test_values_near_zero_are_compared_at_their_rounding_not_their_size(name, field, moved, status):
    values = [moved(i, x) for i, x in enumerate(FALLING)]
    assert abs(values[-1] - FALLING[-1]) / FALLING[-1] > TOLERANCES["fp32"].grad_rtol  # beyond the relative bound alone
    result = verdict(name, make_trace(**{field: values}), make_trace(**{field: FALLING}))
    assert result.status == status, result.message
    if status == "fail":
        assert result.step == STEPS - 1 and "absolute" in result.message, result.message
