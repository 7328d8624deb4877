"""Optimizer steps are counted where DeepSpeed applies them, not by ``engine.step`` calls: some
Trainer releases (transformers 4.47 with accelerate 1.2) call ``engine.step`` on every
micro-batch, others only at the accumulation boundary. Both must give one record per step."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from numerics.cell.spec import RunSpec
from numerics.judge.trace import StepRecord, Trace
from numerics.run import trainer_driver

STEPS, GA = 5, 4


class FakeEngine:
    """DeepSpeed's accumulation bookkeeping only: ``step`` counts a micro-step and applies an
    update at the boundary, which is implicit ((micro_steps + 1) % GA == 0) unless set."""

    def __init__(self, grad_accum: int) -> None:
        self.grad_accum, self.micro_steps, self.global_steps, self.boundary = grad_accum, 0, 0, None
        self.device = "cpu"

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0 if self.boundary is None else self.boundary

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.global_steps += 1
        self.micro_steps += 1


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> tuple[trainer_driver.StepProbe, FakeEngine]:
    """A StepProbe on a fake engine, its measurement reduced to calling the step."""
    def measure(engine: Any, spec: RunSpec, step: int, batch: Any, losses: Any, do_step: Any) -> tuple[StepRecord, dict]:
        do_step()
        return StepRecord(step=step, loss=float(losses[0]), grad_norm=1.0), {}

    monkeypatch.setattr(trainer_driver, "measure_step", measure)
    spec = RunSpec(driver="trainer", grad_accum=GA, micro_batch=1, steps=STEPS, model="mlp")
    engine = FakeEngine(GA)
    micro_batches = SimpleNamespace(take_step=lambda device: ([0], 2.0))
    trainer = SimpleNamespace(deepspeed=engine, micro_batches=micro_batches)
    probe = trainer_driver.StepProbe(trainer, spec, [{}], Trace(cell=spec.cell_id, spec=spec.to_dict()))
    probe.on_train_begin(None, None, None)
    return probe, engine


def test_engine_step_on_every_micro_batch_gives_one_record_per_step(probe) -> None:
    """accelerate 1.2's DeepSpeed backward: ``engine.step()`` after every micro-batch."""
    probe, engine = probe
    for _ in range(STEPS * GA):
        engine.step()
    assert [r.step for r in probe.trace.steps] == list(range(STEPS)), f"{len(probe.trace.steps)} records for {STEPS} steps of GA {GA}"
    assert len(probe.trace.meta["step_samples"]) == STEPS
    probe.on_train_end(None, None, None)  # DeepSpeed's own count agrees


def test_engine_step_at_the_boundary_only_gives_one_record_per_step(probe) -> None:
    """accelerate 1.3+: the boundary is set explicitly and ``engine.step()`` runs only there."""
    probe, engine = probe
    engine.boundary = True
    for _ in range(STEPS):
        engine.micro_steps += GA - 1  # the micro-batches before the boundary call no step
        engine.step()
    assert len(probe.trace.steps) == STEPS
    probe.on_train_end(None, None, None)


def test_a_step_deepspeed_applied_unmeasured_is_an_error(probe) -> None:
    probe, engine = probe
    engine.global_steps += 1  # an update the probe never saw
    with pytest.raises(RuntimeError, match="DeepSpeed applied 1 optimizer steps, the probe measured 0"):
        probe.on_train_end(None, None, None)
