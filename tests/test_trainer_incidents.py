"""Incidents 3, 4 and 6 under ``transformers.Trainer``: most fine-tuning runs go through the
Trainer, which scales the loss for accumulation, steps, evaluates and logs on its own, so each
incident's clean cell must pass and its fault must be caught there too, by the same invariants
as under the engine driver. Incident 6 runs on both loss paths: the stock
one (the model's loss, the Trainer's token counting) against the reference on the samples it
drew, and the custom one held to the engine driver's own numbers, since it backpropagates the
workload's loss in the same order."""
import pytest

from numerics.cell.faults import FAULTS
from numerics.cell.matrix import fault_cell
from numerics.cell.spec import RunSpec
from numerics.judge.invariants import assert_step0_grads, relative
from numerics.show.plugin import expect_pass

pytestmark = pytest.mark.multigpu

PARITY = ("parity_loss", "parity_grad_norm", "step0_grads")
EPOCH_FAULTS = {"optimizer_reset_at_epoch": "epoch_continuity", "eval_skipped": "eval_present"}
SAME_RUN_RTOL = 1e-6  # measured bit-identical (ZeRO 0 and 3, GA 1 and 4); the bound only allows for reduction order


def trainer_cell(fault: str, clean: bool = False, driver: str = "trainer", trainer_loss: str = "stock") -> RunSpec:
    """The fault's cell (or its clean twin) under a Trainer driver."""
    return fault_cell(FAULTS[fault], clean=clean).with_(driver=driver, trainer_loss=trainer_loss)


def fired(result) -> set[str]:
    return {v.invariant for v in result.verdicts if v.failed}


def test_trainer_overfits_two_samples(run_cell) -> None:
    expect_pass(run_cell(trainer_cell("label_mask_leak", clean=True, trainer_loss="custom")))  # both samples every step, see matrix.py


def test_trainer_label_mask_leak_is_caught(run_cell) -> None:
    result = run_cell(trainer_cell("label_mask_leak", trainer_loss="custom"))
    assert {"overfits", "supervised_tokens"} <= fired(result) and "finite" not in fired(result), result.story()


def test_trainer_epochs_pass(run_cell) -> None:
    expect_pass(run_cell(trainer_cell("eval_skipped", clean=True, driver="trainer_epochs")))


@pytest.mark.parametrize(("name", "target"), list(EPOCH_FAULTS.items()))
def test_trainer_epoch_fault_is_caught(run_cell, name: str, target: str) -> None:
    result = run_cell(trainer_cell(name, driver="trainer_epochs"))
    assert target in fired(result) and "finite" not in fired(result), result.story()


def test_trainer_stock_padded_accumulation_passes(run_cell) -> None:
    """The Trainer's own token counting across GA 4 must give the token mean over the global batch."""
    expect_pass(run_cell(trainer_cell("naive_token_mean", clean=True)))


def test_trainer_padded_accumulation_matches_engine_driver(run_cell) -> None:
    """Same spec, both drivers: the Trainer's GA division and accelerate's backward must give the
    engine driver's per-step losses and step-0 gradients (global-token normalisation kept)."""
    spec = trainer_cell("naive_token_mean", clean=True, trainer_loss="custom")
    trainer, engine = run_cell(spec), run_cell(spec.with_(driver="engine", trainer_loss="stock"))  # the field's default: no Trainer
    expect_pass(trainer)
    got, want = trainer.outcome.trace, engine.outcome.trace
    worst = max(relative(a.loss, b.loss) for a, b in zip(got.steps, want.steps, strict=True))
    assert worst <= SAME_RUN_RTOL, f"trainer vs engine loss differs by {worst:.3g} relative"
    verdict = assert_step0_grads(got, want)
    assert verdict.status == "pass", verdict.message


def test_trainer_naive_token_mean_is_caught(run_cell) -> None:
    result = run_cell(trainer_cell("naive_token_mean", trainer_loss="custom"))  # the stock loss has no seam for it
    assert set(PARITY) <= fired(result) and "finite" not in fired(result), result.story()
