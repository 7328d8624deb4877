"""Invariants: functions over traces that say pass, fail or n/a, and why.

Each takes the cell's trace and its reference and returns a `Verdict` whose
message names the cell, the step, the value and the bound, so a nightly failure
reads without rerunning. A field the cell lacks makes the verdict ``n/a``,
never ``pass``. Verdicts are computed in the parent from what every rank sent,
so all ranks of a cell fail together and none is left hanging.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import traceback
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from numerics.cell.invariant_sets import INVARIANT_NAMES
from numerics.cell.spec import RunSpec
from numerics.judge.thresholds import THRESHOLDS, Tolerance, tolerance
from numerics.judge.trace import StepRecord, Trace

Status = Literal["pass", "fail", "n/a", "xfail", "xpass", "cannot run", "cannot build"]


@dataclass
class Verdict:
    invariant: str
    status: Status
    message: str = ""
    step: int | None = None
    reason: str = ""  # for xfail/xpass: the known deviation
    # The figures a failure was judged by, by name (e.g. ``ratio``, ``worst_rel``, ``step``,
    # ``rtol``): what a known deviation's signature is checked against (deviations.py).
    measured: dict[str, float] = dataclasses.field(default_factory=dict)
    signature: str = ""  # the known deviation's signature, when one matched this verdict by cell and release

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "xpass")


Check = Callable[[Trace, Trace | None], Verdict]
INVARIANTS: dict[str, Check] = {}
PER_STEP: set[str] = set()  # invariants that read the step records, so need all of them


def invariant(name: str, per_step: bool = True) -> Callable[[Check], Check]:
    """Register ``check`` under ``name``, one of the names cells may declare
    (`numerics.cell.invariant_sets.INVARIANT_NAMES`, where a new invariant's name goes too)."""
    if name not in INVARIANT_NAMES:
        raise ValueError(f"invariant {name!r} is not in numerics.cell.invariant_sets.INVARIANT_NAMES: add it there")

    def register(check: Check) -> Check:
        INVARIANTS[name] = check
        if per_step:
            PER_STEP.add(name)
        return check

    return register


def _pass(name: str, message: str = "") -> Verdict:
    return Verdict(name, "pass", message)


def _na(name: str, message: str) -> Verdict:
    return Verdict(name, "n/a", message)


def _fail(name: str, trace: Trace, step: int | None, message: str, **measured: float) -> Verdict:
    where = f" at step {step}" if step is not None else ""
    figures = ({"step": step} if step is not None else {}) | measured
    return Verdict(name, "fail", f"[{trace.cell}]{where}: {message}", step, measured=figures)


def _tolerance(trace: Trace):
    spec = trace.spec
    return tolerance(spec.get("dtype", "fp32"), spec.get("comm_dtype"), spec.get("base_dtype"), spec.get("lora", False))


def _applied(trace: Trace) -> list:
    """Steps whose update was applied (fp16 overflow steps are skipped by design)."""
    return [s for s in trace.steps if not s.skipped]


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-30)


def near_zero_atol(rtol: float, first: float | None) -> float:
    """The absolute term of a per-step comparison: ``rtol`` at a tenth of where the figure
    started (``THRESHOLDS.near_zero_fraction``), so a loss or norm that falls towards 0 is
    compared at the precision of its rounding, not of its shrinking self."""
    return rtol * THRESHOLDS.near_zero_fraction * abs(first or 0.0)


def close(value: float, expected: float, rtol: float, atol: float) -> bool:
    """``torch.testing.assert_close``'s rule: ``|value - expected| <= atol + rtol * |expected|``."""
    return abs(value - expected) <= atol + rtol * abs(expected)


@invariant("finite")
def assert_finite(trace: Trace, reference: Trace | None) -> Verdict:
    """Loss every step, grad and parameter norms every applied step, are finite."""
    for record in trace.steps:
        fields = {"loss": record.loss, "param_norm": record.param_norm}
        if not record.skipped:
            fields["grad_norm"] = record.grad_norm
        for name, value in fields.items():
            if value is not None and not math.isfinite(value):
                return _fail("finite", trace, record.step, f"{name} = {value}")
    return _pass("finite")


@invariant("no_collapse")
def assert_no_collapse(trace: Trace, reference: Trace | None) -> Verdict:
    """The loss cannot clearly beat the data's entropy rate, and gradients cannot vanish above it."""
    if trace.entropy_floor is None or trace.entropy_rate is None:
        return _na("no_collapse", "the cell's data has no known entropy rate")
    for record in trace.steps:
        if record.loss < trace.entropy_floor:
            return _fail("no_collapse", trace, record.step,
                         f"loss {record.loss:.4f} is below the entropy floor {trace.entropy_floor:.4f} "
                         f"(H = {trace.entropy_rate:.4f} nats, {THRESHOLDS.entropy_floor_sigmas:g} standard errors): "
                         "the model sees its targets, or the loss is computed wrong")
        if (not record.skipped and record.grad_norm is not None and record.grad_norm <= THRESHOLDS.zero_grad_norm
                and record.loss > trace.entropy_rate):
            return _fail("no_collapse", trace, record.step,
                         f"grad norm {record.grad_norm:.3g} with loss {record.loss:.4f} above H = {trace.entropy_rate:.4f}: gradients vanished")
    return _pass("no_collapse")


def _spike(trace: Trace, name: str, field: str, ratio: float) -> Verdict:
    records = [r for r in _applied(trace) if getattr(r, field) is not None]
    if len(records) <= THRESHOLDS.spike_warmup:
        return _na(name, f"only {len(records)} steps with {field}")
    for index in range(THRESHOLDS.spike_warmup, len(records)):
        window = [getattr(r, field) for r in records[max(0, index - THRESHOLDS.spike_window):index]]
        median = statistics.median(window)
        value = getattr(records[index], field)
        if value > ratio * median:
            times = f"{value / median:.1f}x" if median > 0 else "above"
            return _fail(name, trace, records[index].step,
                         f"{field} {value:.4g} is {times} its running median {median:.4g} (bound {ratio:g}x)")
    return _pass(name)


@invariant("no_spike")
def assert_no_spike(trace: Trace, reference: Trace | None) -> Verdict:
    """Neither the loss nor the grad norm jumps against its running median after warm-up."""
    loss = _spike(trace, "no_spike", "loss", THRESHOLDS.loss_spike_ratio)
    if loss.status == "fail":
        return loss
    grad = _spike(trace, "no_spike", "grad_norm", THRESHOLDS.grad_spike_ratio)
    return grad if grad.status == "fail" else loss


@invariant("learns")
def assert_learns(trace: Trace, reference: Trace | None) -> Verdict:
    """The last window's mean loss closes part of the gap between the first window and H."""
    window = THRESHOLDS.learn_window
    if len(trace.steps) < 2 * window:
        return _na("learns", f"{len(trace.steps)} steps, need {2 * window}")
    first = statistics.fmean(trace.values("loss")[:window])
    last = statistics.fmean(trace.values("loss")[-window:])
    target = trace.entropy_rate if trace.entropy_rate is not None else 0.0
    needed = first - THRESHOLDS.learn_fraction * (first - target)
    if not last <= needed:
        return _fail("learns", trace, None,
                     f"mean loss {first:.4f} over the first {window} steps fell only to {last:.4f} over the last "
                     f"{window}; needed <= {needed:.4f} ({THRESHOLDS.learn_fraction:.0%} of the way to {target:.4f})",
                     closed=(first - last) / (first - target) if first != target else 0.0)
    return _pass("learns", f"{first:.4f} -> {last:.4f}")


def aligned(trace: Trace, reference: Trace) -> list[tuple[StepRecord, StepRecord]]:
    """Each applied step of ``trace`` with the reference step it compares to: a reference
    built for a cell that skipped steps has one step per applied one."""
    applied = _applied(trace)
    steps = reference.steps if len(reference.steps) == len(applied) else [reference.steps[r.step] for r in applied]
    return list(zip(applied, steps))


def ratios(pairs: list[tuple[float | None, float | None]]) -> dict[str, float]:
    """Over every step that has both, the range of value / expected and the worst relative
    difference (NaN if any is): what a known deviation's signature bounds, a scale error showing
    as a constant ratio, a drift as a growing difference."""
    known = np.array([(v, e) for v, e in pairs if v is not None and e is not None], dtype=np.float64)
    ratio = known[:, 0] / np.where(known[:, 1] == 0, np.nan, known[:, 1])
    error = np.abs(known[:, 0] - known[:, 1]) / np.maximum(np.abs(known[:, 1]), 1e-30)
    return {"ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()), "worst_rel": float(error.max())}


def _parity(trace: Trace, reference: Trace | None, name: str, field: str, rtol: float) -> Verdict:
    if reference is None:
        return _na(name, "no reference trace")
    steps = aligned(trace, reference)
    pairs = [(getattr(record, field), getattr(ref, field)) for record, ref in steps]
    atol = near_zero_atol(rtol, pairs[0][1] if pairs else None)
    for (record, _), (value, expected) in zip(steps, pairs):
        if value is None or expected is None:
            return _na(name, f"{field} not recorded at step {record.step}")
        if not close(value, expected, rtol, atol):
            return _fail(name, trace, record.step,
                         f"{field} {value:.6g} vs reference {expected:.6g}: relative difference "
                         f"{relative(value, expected):.3g} > {rtol:g} ({trace.spec.get('dtype')}) + {atol:.3g} absolute; "
                         "this is the first diverging step",
                         ratio=value / expected if expected else math.inf, rtol=rtol, atol=atol, **ratios(pairs))
    return _pass(name)


@invariant("parity_loss")
def assert_parity_loss(trace: Trace, reference: Trace | None) -> Verdict:
    """Per-step loss matches the plain-PyTorch fp32 reference within the dtype's tolerance."""
    return _parity(trace, reference, "parity_loss", "loss", _tolerance(trace).loss_rtol)


@invariant("parity_grad_norm")
def assert_parity_grad_norm(trace: Trace, reference: Trace | None) -> Verdict:
    """Per-step gradient norm matches the reference: Adam hides scale bugs from the loss, not from this."""
    return _parity(trace, reference, "parity_grad_norm", "grad_norm", _tolerance(trace).grad_rtol)


@invariant("init_matches", per_step=False)
def assert_init_matches(trace: Trace, reference: Trace | None) -> Verdict:
    """The cell starts from the reference's weights, bit for bit."""
    if reference is None or trace.init_checksum is None:
        return _na("init_matches", "no initial checksum")
    if trace.init_checksum != reference.init_checksum:
        return _fail("init_matches", trace, 0, f"initial weights {trace.init_checksum} differ from the reference's {reference.init_checksum}")
    return _pass("init_matches")


def step0_scale(trace: Trace, reference: Trace) -> float:
    """The least-squares scale of the cell's step-0 gradient along the reference's, over all parameters."""
    along = sum(float(trace.step0_grads[n].reshape(-1).astype(np.float64) @ r.reshape(-1).astype(np.float64))
                for n, r in reference.step0_grads.items())
    return along / max(sum(float(np.square(r.astype(np.float64)).sum()) for r in reference.step0_grads.values()), 1e-300)


@invariant("step0_grads", per_step=False)
def assert_step0_grads(trace: Trace, reference: Trace | None) -> Verdict:
    """At step 0, with identical weights, every parameter's full gradient matches the reference
    tightly, and so does the gradient's overall scale.

    Rounding in bf16 or fp16 moves each gradient by up to a few percent (relative L2), which
    would hide a uniform scale error of that size; but rounding is nearly orthogonal to the
    gradient, so the least-squares scale of the gradient along the reference's,
    <g, g_ref> / <g_ref, g_ref> over all parameters, stays within a much tighter bound: a
    wrong divisor or a per-micro-batch normalisation shows there first."""
    if reference is None or trace.step0_grads is None or reference.step0_grads is None:
        return _na("step0_grads", "no step-0 gradients")
    if trace.steps and trace.steps[0].skipped:
        return _na("step0_grads", "step 0 overflowed and was skipped")
    tol, worst = _tolerance(trace), ("", 0.0)
    for name, expected in reference.step0_grads.items():
        got = trace.step0_grads.get(name)
        if got is None:
            return _fail("step0_grads", trace, 0, f"no gradient for {name}")
        error = float(np.linalg.norm(got.reshape(-1) - expected.reshape(-1)) / max(np.linalg.norm(expected), 1e-30))
        worst = max(worst, (name, error), key=lambda item: item[1])
    scale = step0_scale(trace, reference)
    figures = {"worst_rel": worst[1], "scale": scale, "rtol": tol.step0_grad_rtol, "scale_rtol": tol.step0_scale_rtol}
    if worst[1] > tol.step0_grad_rtol:
        return _fail("step0_grads", trace, 0, f"gradient of {worst[0]} differs from the reference by {worst[1]:.3g} "
                     f"(relative L2) > {tol.step0_grad_rtol:g}", **figures)
    if not abs(scale - 1.0) <= tol.step0_scale_rtol:
        return _fail("step0_grads", trace, 0, f"the gradient is {scale:.6g}x the reference's along its direction "
                     f"(|scale - 1| {abs(scale - 1.0):.3g} > {tol.step0_scale_rtol:g}), every parameter within "
                     f"{tol.step0_grad_rtol:g}: a uniform scale error (divisor, token count, normalisation)", **figures)
    return _pass("step0_grads", f"worst {worst[0]} {worst[1]:.2g}; scale 1{scale - 1.0:+.2g}")


@invariant("grad_norm_agrees")
def assert_grad_norm_agrees(trace: Trace, reference: Trace | None) -> Verdict:
    """The engine's reported grad norm (what users log and clip by) equals the independently computed one."""
    rtol = _tolerance(trace).grad_norm_agree_rtol
    applied = _applied(trace)
    pairs = [(r.grad_norm_reported, r.grad_norm) for r in applied]
    atol = near_zero_atol(rtol, next((computed for _, computed in pairs if computed is not None), None))
    for record, (reported, computed) in zip(applied, pairs):
        if reported is None or computed is None:
            continue
        if not close(reported, computed, rtol, atol):
            return _fail("grad_norm_agrees", trace, record.step,
                         f"engine reports grad norm {reported:.6g}, computed {computed:.6g} "
                         f"(relative difference {relative(reported, computed):.3g} > {rtol:g} + {atol:.3g} absolute)",
                         ratio=reported / computed if computed else math.inf, rtol=rtol, atol=atol, **ratios(pairs))
    if not any(reported is not None and computed is not None for reported, computed in pairs):
        return _na("grad_norm_agrees", "the engine reported no grad norm")
    return _pass("grad_norm_agrees")


@invariant("replicas_agree")
def assert_replicas_agree(trace: Trace, reference: Trace | None) -> Verdict:
    """After every step, every rank holds what it should.

    ZeRO 0-2: every rank holds the module's weights whole, and their checksums must be equal
    across ranks, bit for bit. At ZeRO-1/2 these are the working weights (low precision where
    the cell is) each rank rebuilds from DeepSpeed's all-gather of the updated partitions: a rank
    that did not receive or apply the update differs.

    ZeRO-3: no rank holds a parameter whole. The checksums are then of the fp32 master that the
    measurement assembles from every rank's partitions, equal on every rank unless that gather
    misbehaves, so they are still compared but prove little. What each rank alone holds, its
    slice of the fp32 master, is compared with the reference's same slices instead
    (`partition_updates_agree`)."""
    for record in trace.steps:
        if len(set(record.param_checksums)) > 1:
            return _fail("replicas_agree", trace, record.step, f"parameter checksums differ across ranks: {record.param_checksums}")
    if not any(len(r.param_checksums) > 1 for r in trace.steps):
        return _na("replicas_agree", "single rank")
    if trace.spec.get("zero_stage") == 3:
        return partition_updates_agree(trace, reference)
    return _pass("replicas_agree")


def partition_updates_agree(trace: Trace, reference: Trace | None) -> Verdict:
    """ZeRO-3: at every applied step, what each rank's slices of the fp32 master moved by (the norm
    of the update over all its slices) equals what the reference's same slices moved by, within
    the dtype's ``partition_update_rtol``. A rank that misses an update moves by 0 where the
    reference moves; one that applies a stale or foreign update moves by the wrong amount.
    The update, not the weights, is compared: over 16 steps a bf16 cell's slices drift from the
    fp32 reference by about as much as one update moves them (thresholds.py), which would hide a
    missed step in the weights; in that step's update it is off by 100 %."""
    name = "replicas_agree"
    if reference is None:
        return _na(name, "ZeRO-3: no reference to compare each rank's partition with")
    if "parity_loss" not in trace.spec.get("invariants", ()):
        return _na(name, "ZeRO-3: the cell is not held to parity with its reference, so no rank's "
                   "partition can be compared with it")
    rtol = _tolerance(trace).partition_update_rtol
    for record, expected in aligned(trace, reference):
        if not record.partition_updates or len(record.partition_updates) != len(expected.partition_updates):
            return _na(name, f"ZeRO-3: {len(record.partition_updates)} ranks' partition updates recorded at step "
                       f"{record.step}, the reference has {len(expected.partition_updates)} slices")
        for rank, (updates, reference_updates) in enumerate(zip(record.partition_updates, expected.partition_updates)):
            if updates.keys() != reference_updates.keys():
                return _fail(name, trace, record.step, f"rank {rank} recorded the updates of {sorted(updates)}, "
                             f"the reference of {sorted(reference_updates)}")
            moved, should = math.hypot(*updates.values()), math.hypot(*reference_updates.values())
            if not relative(moved, should) <= rtol:
                worst = max(reference_updates, key=lambda p: abs(updates[p] - reference_updates[p]))
                return _fail(name, trace, record.step,
                             f"rank {rank}'s slices of the fp32 master moved by {moved:.6g} (update norm over every "
                             f"parameter), the reference's same slices by {should:.6g}: relative difference "
                             f"{relative(moved, should):.3g} > {rtol:g} ({trace.spec.get('dtype')}); most off: {worst} "
                             f"{updates[worst]:.6g} vs {reference_updates[worst]:.6g}. The ranks' checksums agree: "
                             "every rank assembles the same master from the partitions, this one included",
                             update_rel=relative(moved, should), rtol=rtol)
    return _pass(name, "ZeRO-3: every rank's partitions moved with the reference's same slices")


@invariant("gathered_params_match")
def assert_gathered_params_match(trace: Trace, reference: Trace | None) -> Verdict:
    """ZeRO-3: after every step, on every rank, ``GatheredParameters`` shows exactly the fp32
    master in the module's dtype: the weights a forward pass, a user's logging or a 16-bit
    save read. A stale or half-gathered buffer there trains correctly yet saves garbage."""
    wrong = [r for r in trace.steps if any(not e == 0.0 for e in r.gathered_errors)]  # NaN included
    if wrong:
        record = wrong[0]
        worst = max(record.gathered_errors)
        return _fail("gathered_params_match", trace, record.step,
                     f"GatheredParameters differs from the fp32 master by up to {worst:.3g} "
                     f"(per rank: {[f'{e:.3g}' for e in record.gathered_errors]}; bit-exact expected; "
                     f"wrong at {len(wrong)} of {len(trace.steps)} steps)",
                     worst=worst, ranks_wrong=sum(not e == 0.0 for e in record.gathered_errors),
                     ranks=len(record.gathered_errors), steps_wrong=len(wrong), steps=len(trace.steps))
    if not any(r.gathered_errors for r in trace.steps):
        return _na("gathered_params_match", "parameters are not partitioned (ZeRO 0-2)")
    return _pass("gathered_params_match")


def _needs(trace: Trace, name: str, *keys: str) -> Verdict | None:
    missing = [k for k in keys if k not in trace.meta]
    return _na(name, f"not a LoRA cell (no {', '.join(missing)})") if missing else None


@invariant("adapter_dtype_policy", per_step=False)
def assert_adapter_dtype_policy(trace: Trace, reference: Trace | None) -> Verdict:
    """The tensors the optimizer steps are fp32: fp16 cannot hold Adam's eps (1e-8) or small updates."""
    if (na := _needs(trace, "adapter_dtype_policy", "stepped_dtypes")) is not None:
        return na
    stepped, state = trace.meta["stepped_dtypes"], trace.meta.get("optimizer_state_dtypes", [])
    low = sorted({d for d in stepped + state if d != "torch.float32"})
    if low:
        return _fail("adapter_dtype_policy", trace, None,
                     f"{trace.meta['optimizer']} steps {stepped} tensors (optimizer state {state}) with trainable "
                     f"parameters {trace.meta['trainable_dtypes']}: a pure-{'/'.join(low)} update, no fp32 master copy")
    return _pass("adapter_dtype_policy", f"steps {stepped}")


@invariant("frozen_base_unchanged", per_step=False)
def assert_frozen_base_unchanged(trace: Trace, reference: Trace | None) -> Verdict:
    """Frozen base weights are bit-identical after training to what they were after initialize."""
    if (na := _needs(trace, "frozen_base_unchanged", "frozen_checksum_start", "frozen_checksum_end")) is not None:
        return na
    start, end = trace.meta["frozen_checksum_start"], trace.meta["frozen_checksum_end"]
    if start != end:
        return _fail("frozen_base_unchanged", trace, None, f"frozen weights changed: checksum {start} -> {end}")
    return _pass("frozen_base_unchanged")


@invariant("adapters_learn")
def assert_adapters_learn(trace: Trace, reference: Trace | None) -> Verdict:
    """Every LoRA B leaves zero, and every applied step moves the adapters."""
    if (na := _needs(trace, "adapters_learn", "lora_b_still_zero")) is not None:
        return na
    if trace.meta["lora_b_still_zero"]:
        return _fail("adapters_learn", trace, None, f"LoRA B still all zero after training: {trace.meta['lora_b_still_zero']}")
    for record in _applied(trace):
        if record.update_norm is not None and record.update_norm == 0.0:
            return _fail("adapters_learn", trace, record.step, "update norm is 0 at a step that was not skipped")
    return _pass("adapters_learn")


@invariant("merged_logits_match", per_step=False)
def assert_merged_logits_match(trace: Trace, reference: Trace | None) -> Verdict:
    """Merging the adapters into the base gives the unmerged logits within the dtype's tolerance."""
    if (na := _needs(trace, "merged_logits_match", "merge_logits_rel_error")) is not None:
        return na
    error, rtol = trace.meta["merge_logits_rel_error"], _tolerance(trace).logits_rtol
    if not error <= rtol:
        return _fail("merged_logits_match", trace, None, f"merged vs unmerged logits differ by {error:.3g} (relative max) > {rtol:g}")
    return _pass("merged_logits_match", f"{error:.2g}")


def _resume_mismatch(record, expected: dict) -> str | None:
    """What differs between a resumed step and the same step uninterrupted, or None.

    Exact in every dtype: the uninterrupted run is the same engine on the same ranks with the
    same reduction order, and a checkpoint holds the master weights, optimizer state and loss
    scale, so nothing may differ (measured bit-exact at ZeRO 0-3 fp32 and ZeRO-2 bf16). A
    tolerance would hide a reset optimizer in bf16: its drift, 1.2e-3 in loss, is below bf16's."""
    if record.loss != expected["loss"] or record.grad_norm != expected["grad_norm"]:
        return (f"loss {record.loss!r} / grad norm {record.grad_norm!r} vs uninterrupted "
                f"{expected['loss']!r} / {expected['grad_norm']!r} (bit-exact expected)")
    if set(record.param_checksums) != {expected["param_checksum"]}:
        return f"parameter checksums {record.param_checksums} vs uninterrupted {expected['param_checksum']} (bit-exact expected)"
    return None


@invariant("resume_matches")
def assert_resume_matches(trace: Trace, reference: Trace | None) -> Verdict:
    """Every step after a checkpoint resume equals the same step of the run uninterrupted (which the
    resume driver records beside it), bit for bit."""
    if "uninterrupted" not in trace.meta:
        return _na("resume_matches", "not a resume cell (no uninterrupted run recorded)")
    resume_step, expected = trace.meta["resume_step"], trace.meta["uninterrupted"]
    for record in trace.steps[resume_step:]:
        mismatch = _resume_mismatch(record, expected[record.step])
        if mismatch:
            resumed = trace.steps[resume_step:]
            return _fail("resume_matches", trace, record.step, f"resumed at step {resume_step}, then {mismatch}",
                         after_resume=record.step - resume_step,
                         params_only=float(record.loss == expected[record.step]["loss"]
                                           and record.grad_norm == expected[record.step]["grad_norm"]),
                         **ratios([(r.loss, expected[r.step]["loss"]) for r in resumed]))
    return _pass("resume_matches", f"{len(trace.steps) - resume_step} steps after the resume at step {resume_step} match")


@invariant("epoch_continuity")
def assert_epoch_continuity(trace: Trace, reference: Trace | None) -> Verdict:
    """The loss does not jump up at an epoch boundary more than the reference's does: a training
    loop that resets state there (optimizer, lr schedule) shows it as a step in the curve. The
    reference replays the same finite dataset with the same schedule, so what differs between the
    last batches of an epoch and the first of the next cancels; only the loop's own jump is left."""
    per_epoch = trace.meta.get("batches_per_epoch")
    if per_epoch is None:
        return _na("epoch_continuity", "not a multi-epoch cell (no batches_per_epoch)")
    if reference is None:
        return _na("epoch_continuity", "no reference trace")
    losses = {record.step: (record.loss, ref.loss) for record, ref in aligned(trace, reference)}
    window, bound, jumps = THRESHOLDS.epoch_window, _tolerance(trace).epoch_jump, []
    # A step's loss is measured before its update: the model that finished epoch k is measured at
    # the first step of epoch k+1, and the first model that saw epoch k+1 at the step after.
    for start in range(per_epoch + 1, len(trace.steps) - window + 1, per_epoch):
        before, after = range(start - window, start), range(start, start + window)
        if not all(step in losses for step in (*before, *after)):
            continue  # a skipped step in a window: no like-for-like pair of windows
        (cell_before, ref_before), (cell_after, ref_after) = (
            [statistics.fmean(losses[step][i] for step in steps) for i in (0, 1)] for steps in (before, after))
        rise, ref_rise = cell_after - cell_before, ref_after - ref_before
        jumps.append(rise - ref_rise)
        if rise - ref_rise > bound:
            return _fail("epoch_continuity", trace, start,
                         f"mean loss rose from {cell_before:.4f} over the last {window} steps of epoch {start // per_epoch - 1} "
                         f"to {cell_after:.4f} over the first {window} of the next ({rise:+.4f}), the reference's by "
                         f"{ref_rise:+.4f} on the same batches: {rise - ref_rise:+.4f} > {bound:g} nats ({trace.spec.get('dtype')})",
                         excess=rise - ref_rise)
    if not jumps:
        return _na("epoch_continuity", "no epoch boundary with every step of both windows applied")
    return _pass("epoch_continuity", "jumps beyond the reference's " + ", ".join(f"{j:+.4f}" for j in jumps))


@invariant("eval_present")
def assert_eval_present(trace: Trace, reference: Trace | None) -> Verdict:
    """Every scheduled eval ran and gave a finite loss: an eval that silently stops hides overfitting."""
    scheduled = trace.meta.get("eval_steps")
    if not scheduled:
        return _na("eval_present", "no eval schedule")
    evals = {record.step: record.eval_loss for record in trace.steps}
    missing = [step for step in scheduled if evals.get(step) is None or not math.isfinite(evals[step])]
    if missing:
        return _fail("eval_present", trace, missing[0],
                     f"{len(missing)} of {len(scheduled)} scheduled evals missing or not finite, at steps {missing}")
    return _pass("eval_present", f"{len(scheduled)} evals")


@invariant("overfits")
def assert_overfits(trace: Trace, reference: Trace | None) -> Verdict:
    """The final loss on a fixed batch falls below THRESHOLDS.overfit_loss: a loop that cannot memorise two
    samples supervises something unpredictable, or does not train what it computes."""
    if len(trace.steps) < THRESHOLDS.overfit_window:
        return _na("overfits", f"{len(trace.steps)} steps, need {THRESHOLDS.overfit_window}")
    final = statistics.fmean(trace.values("loss")[-THRESHOLDS.overfit_window:])
    if not final < THRESHOLDS.overfit_loss:
        return _fail("overfits", trace, None,
                     f"mean loss over the last {THRESHOLDS.overfit_window} of {len(trace.steps)} steps is {final:.4f}, not below "
                     f"{THRESHOLDS.overfit_loss:g}: a floor near ln 2 x k / (supervised tokens) means k supervised tokens "
                     "follow identical prefixes (check the label mask)")
    return _pass("overfits", f"final loss {final:.4f}")


@invariant("supervised_tokens")
def assert_supervised_tokens(trace: Trace, reference: Trace | None) -> Verdict:
    """Every step supervises as many targets as the workload's response mask says: a label mask
    that leaks prompt or special tokens, or drops response tokens, shows at step 0."""
    from numerics.cell.workloads import get_workload  # late: workloads import torch

    spec = RunSpec.from_dict(trace.spec)
    for record in trace.steps:
        mask = get_workload(spec.workload).response_mask(spec, record.step)
        if mask is None or record.supervised_tokens is None:
            return _na("supervised_tokens", "the workload has no response mask, or the count was not recorded")
        expected = int(mask[:, 1:].sum())
        if record.supervised_tokens != expected:
            return _fail("supervised_tokens", trace, record.step,
                         f"{record.supervised_tokens} supervised targets, the response mask says {expected} "
                         "(numerics.cell.label_mask.check_label_mask names the positions)")
    return _pass("supervised_tokens")


# Each figure a Trainer logs: the StepRecord field that measured it at the same step, its relative
# tolerance and its absolute one (a release that rounds what it logs).
LOGGED_FIGURES: dict[str, tuple[str, Callable[[Tolerance], float], float]] = {
    "loss": ("loss", lambda tol: tol.loss_rtol, THRESHOLDS.logged_loss_atol),
    "grad_norm": ("grad_norm", lambda tol: tol.grad_norm_agree_rtol, 0.0),
    "learning_rate": ("lr", lambda tol: THRESHOLDS.logged_lr_rtol, 0.0),
    "eval_loss": ("eval_loss", lambda tol: tol.loss_rtol, 0.0),
}


@invariant("logged_matches")
def assert_logged_matches(trace: Trace, reference: Trace | None) -> Verdict:
    """Every figure the Trainer logged, what its user reads and plots, equals what was measured at
    that step within the dtype's tolerance. A figure it did not log where one was measured fails,
    unless the cell declares why it cannot be logged (``meta["unlogged"]``)."""
    if "unlogged" not in trace.meta:
        return _na("logged_matches", "not a Trainer cell (no logged figures recorded)")
    unlogged, tol, compared = trace.meta["unlogged"], _tolerance(trace), 0
    for record in trace.steps:
        logged = record.extra.get("logged", {})
        for figure, (field, rtol_of, atol) in LOGGED_FIGURES.items():
            measured = getattr(record, field)
            if measured is None or (figure == "grad_norm" and record.skipped) or (figure not in logged and figure in unlogged):
                continue
            if figure not in logged:
                return _fail("logged_matches", trace, record.step,
                             f"the Trainer logged no {figure} (measured {measured:.6g}), and the cell does not declare why")
            rtol, value = rtol_of(tol), logged[figure]
            if not close(value, measured, rtol, atol):
                return _fail("logged_matches", trace, record.step,
                             f"the Trainer logged {figure} {value:.6g}, measured {measured:.6g}: relative difference "
                             f"{relative(value, measured):.3g} > {rtol:g} ({trace.spec.get('dtype')}) + {atol:g} absolute; "
                             "its user reads a wrong figure",
                             **{f"{figure}_ratio": value / measured if measured else math.inf}, rtol=rtol)
            compared += 1
    if not compared:
        return _na("logged_matches", "no logged figure was measured")
    declared = "; ".join(f"{figure} not logged: {why}" for figure, why in unlogged.items())
    return _pass("logged_matches", f"{compared} figures match" + (f" ({declared})" if declared else ""))


@invariant("memory_bounded", per_step=False)
def assert_memory_bounded(trace: Trace, reference: Trace | None) -> Verdict:
    """No rank's resident memory peaks above THRESHOLDS.max_rank_rss_mib during the cell: a leak
    in a persistent rank grows cell after cell, and a cell that holds on every rank what ZeRO
    should partition shows it here, in the cell that did it, not as an OOM kill of a later one."""
    peaks, bound = trace.meta.get("peak_rss_mib_per_rank"), THRESHOLDS.max_rank_rss_mib
    if not peaks or None in peaks:
        return _na("memory_bounded", f"peak resident memory not recorded for every rank ({peaks}; needs Linux /proc)")
    worst = max(range(len(peaks)), key=peaks.__getitem__)
    if not peaks[worst] <= bound:
        return _fail("memory_bounded", trace, None,
                     f"rank {worst} peaked at {peaks[worst]:.0f} MiB resident > {bound:g} MiB "
                     f"(THRESHOLDS.max_rank_rss_mib, NUMERICS_MAX_RSS_MIB); per rank: {[round(p) for p in peaks]} MiB")
    return _pass("memory_bounded", f"peak {peaks[worst]:.0f} MiB (rank {worst}) <= {bound:g} MiB")


@invariant("engine_released", per_step=False)
def assert_engine_released(trace: Trace, reference: Trace | None) -> Verdict:
    """Every rank freed the cell's model once it ended (``modules_left_per_rank``, counted after the
    engine's ``destroy()`` and a collection): whatever still holds a module holds the engine around
    it, and keeps every engine a process builds (a sweep, a notebook, a persistent rank). DeepSpeed
    up to 0.16.2 does at ZeRO-3: its optimizer's list of AccumulateGrad nodes holds the parameters from
    C++, a cycle the collector cannot see. Counted after the rank drops the two holders every release
    from 0.14.5 to 0.19.8 shares (`drivers.release_zero3_leftovers`), so a new one shows."""
    left = trace.meta.get("modules_left_per_rank")
    if not left or None in left:
        return _na("engine_released", f"modules left alive not counted on every rank ({left})")
    worst = max(range(len(left)), key=left.__getitem__)
    if left[worst]:
        return _fail("engine_released", trace, None,
                     f"rank {worst} still holds {left[worst]} torch modules of the cell after it ended (engine "
                     f"destroyed, collector run): each engine this process builds stays; per rank: {left}",
                     modules_left=float(left[worst]))
    return _pass("engine_released", f"no module of the cell left alive on {len(left)} ranks")


def missing_evidence(trace: Trace) -> str | None:
    """Why the trace holds too few steps for a per-step invariant to mean anything, or None.

    Every step the spec asks for must be there, and enough of them applied: a trace of 2 of 16
    steps, or of 16 fp16 steps all skipped, would pass parity and ``finite`` with next to nothing
    compared."""
    asked = trace.spec.get("steps")
    if asked is not None and len(trace.steps) != asked:
        return f"the trace has {len(trace.steps)} steps, the cell asks for {asked}"
    applied, needed = len(_applied(trace)), math.ceil(THRESHOLDS.min_applied_fraction * len(trace.steps))
    if applied < needed:
        return (f"only {applied} of {len(trace.steps)} steps applied an update (the rest skipped on fp16 "
                f"overflow); at least {needed} ({THRESHOLDS.min_applied_fraction:.0%}) are needed")
    return None


def _judge(name: str, trace: Trace, reference: Trace | None) -> Verdict:
    """One invariant's verdict; one that raises fails with its traceback. A trace of a shape the
    invariant did not expect (a missing metric, more steps than the reference) is a finding
    about this cell: it must fail here, readably, and leave the other invariants and cells judged."""
    try:
        return INVARIANTS[name](trace, reference)
    except Exception:
        return Verdict(name, "fail", f"[{trace.cell}] raised:\n{traceback.format_exc()}")


def check(trace: Trace, reference: Trace | None, names: tuple[str, ...]) -> list[Verdict]:
    """Each named invariant's verdict; the per-step ones fail together when the trace is too short."""
    unknown = sorted(set(names) - set(INVARIANTS))
    if unknown:
        raise KeyError(f"unknown invariants {unknown}; known: {sorted(INVARIANTS)}")
    short = missing_evidence(trace)
    return [_fail(name, trace, None, f"{short}: nothing to compare") if short and name in PER_STEP
            else _judge(name, trace, reference) for name in names]
