"""The trainer driver through a real rank pool: parity with the plain-torch reference, and no
state left behind for the next cell (the ranks are persistent, a Trainer is not)."""
from __future__ import annotations

from typing import Iterator

import pytest

from numerics.cell.spec import RunSpec
from numerics.judge.invariants import assert_step0_grads, relative
from numerics.judge.thresholds import TOLERANCES
from numerics.judge.trace import Trace
from numerics.run.launcher import RankPool
from numerics.run.reference import reference_trace

pytestmark = pytest.mark.multigpu

STEPS = 6  # enough for Adam to move off its first steps; each cell stays ~1-3 s on CPU


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2) as ranks:
        yield ranks


def run(pool: RankPool, spec: RunSpec) -> Trace:
    outcome = pool.run(spec)
    assert outcome.ok, outcome.error
    return outcome.trace


@pytest.mark.parametrize(("stage", "dtype"), [(3, "bf16"), (2, "fp16"), (1, "fp32")])
def test_trainer_matches_reference(pool: RankPool, stage: int, dtype: str) -> None:
    spec = RunSpec(driver="trainer", zero_stage=stage, dtype=dtype, steps=STEPS)
    trace = run(pool, spec)
    reference = reference_trace(spec, trace)  # on the samples the Trainer's own sampler put in each step
    rtol = TOLERANCES[dtype].loss_rtol
    assert trace.meta["driver"] == "trainer" and trace.meta["inherited_state"] == []
    assert len(trace.steps) == STEPS
    for got, want in zip(trace.steps, reference.steps):
        assert relative(got.loss, want.loss) <= rtol, f"step {got.step}: loss {got.loss} vs reference {want.loss}"
        assert relative(got.extra["logged"]["loss"], got.loss) <= rtol, f"step {got.step}: Trainer logged {got.extra['logged']['loss']}"
        assert len(set(got.param_checksums)) == 1, f"step {got.step}: replicas differ {got.param_checksums}"
    verdict = assert_step0_grads(trace, reference)
    assert verdict.status == "pass", verdict.message


def test_trainer_zero3_leaves_nothing_behind(pool: RankPool) -> None:
    """After a Trainer ZeRO-3 cell, the next trainer cell inherits no Trainer state and the next
    engine cell trains bit for bit as in fresh ranks."""
    engine_spec = RunSpec(zero_stage=2, dtype="bf16", steps=3)
    run(pool, RunSpec(driver="trainer", zero_stage=3, dtype="bf16", steps=2))
    assert run(pool, RunSpec(driver="trainer", zero_stage=0, steps=1)).meta["inherited_state"] == []
    after_trainer = run(pool, engine_spec)
    with RankPool(2) as fresh:
        clean = run(fresh, engine_spec)
    assert after_trainer.values("loss") == clean.values("loss")
    assert after_trainer.values("param_checksums") == clean.values("param_checksums")
