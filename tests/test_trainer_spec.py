"""The Trainer's loss path is a RunSpec axis: stock by default (no id suffix), custom named, and
the default matrix covers GA 1, 2 and 4 at every stage and both loss paths."""
import pytest

from numerics.cell.matrix import cells
from numerics.cell.spec import RunSpec, SpecError


def test_the_stock_loss_is_the_default_and_custom_is_named() -> None:
    assert RunSpec(driver="trainer").cell_id == "zero0-fp32-ws2-trainer"
    assert RunSpec(driver="trainer", trainer_loss="custom").cell_id == "zero0-fp32-ws2-trainer-loss_custom"


def test_a_loss_path_needs_a_trainer_driver() -> None:
    with pytest.raises(SpecError, match="trainer_loss='custom' needs a Trainer driver"):
        RunSpec(trainer_loss="custom")


def test_default_trainer_cells_cover_accumulation_at_every_stage_and_both_losses() -> None:
    trainer = [spec for spec in cells() if spec.driver == "trainer" and spec.workload == "markov"]
    assert {(s.zero_stage, s.grad_accum) for s in trainer} == {(stage, ga) for stage in range(4) for ga in (1, 2, 4)}
    assert {s.trainer_loss for s in trainer} == {"stock", "custom"}
    assert all("logged_matches" in s.invariants for s in trainer)
