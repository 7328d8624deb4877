"""Incident 6, "gradient accumulation and world size change the math": on variable-length
``padded`` batches, splitting the global batch over accumulation steps or ranks gives the
whole batch's losses and gradients, as long as the loss is normalised by the step's global
token count; the per-micro-batch mean (fault ``naive_token_mean``) changes both."""
import pytest

from numerics.cell.spec import RunSpec
from numerics.judge.invariants import check
from numerics.show.plugin import expect_pass

pytestmark = pytest.mark.multigpu

# Trace against trace: the parity invariants take any trace as the one to match.
PARITY = ("parity_loss", "parity_grad_norm", "step0_grads")
WHOLE = RunSpec(workload="padded", world_size=1, micro_batch=8)
BF16_WHOLE = WHOLE.with_(dtype="bf16", zero_stage=1)  # ZeRO-0 bf16 AdamW is a known deviation
SPLITS = {
    "ga4": (WHOLE, WHOLE.with_(micro_batch=2, grad_accum=4)),
    "bf16-ga4": (BF16_WHOLE, BF16_WHOLE.with_(micro_batch=2, grad_accum=4)),
    "ws2": (WHOLE, WHOLE.with_(world_size=2, micro_batch=4)),
}


@pytest.fixture(scope="module")
def results():
    """Results by spec: the whole-batch cell runs once and is compared with every split."""
    return {}


@pytest.fixture
def run_once(run_cell, results):
    def run(spec: RunSpec):
        if spec not in results:
            results[spec] = run_cell(spec)
        return results[spec]

    return run


def against(result, other) -> dict[str, str]:
    return {v.invariant: v.status for v in check(result.outcome.trace, other.outcome.trace, PARITY)}


# Module scope groups the tests by split, so each world size's pool starts once.
@pytest.mark.parametrize("split", list(SPLITS), scope="module")
def test_split_matches_whole_batch(split, run_once):
    whole, parts = (run_once(spec) for spec in SPLITS[split])
    expect_pass(whole)
    expect_pass(parts)
    assert set(against(parts, whole).values()) == {"pass"}, against(parts, whole)


@pytest.mark.parametrize("split", list(SPLITS), scope="module")
def test_naive_token_mean_changes_losses_and_gradients(split, run_once):
    whole, parts = SPLITS[split]
    naive = run_once(parts.with_(fault="naive_token_mean"))
    fired = {v.invariant for v in naive.verdicts if v.failed}
    assert set(PARITY) <= fired, naive.story()
    assert "finite" not in fired, naive.story()
    assert set(against(naive, run_once(whole)).values()) == {"fail"}, against(naive, run_once(whole))
