"""The LoRA invariants pass on a healthy adapter run and fail on each adapter bug."""
import math

import pytest
from conftest import make_trace

from numerics.cell.spec import RunSpec
from numerics.judge.invariants import check

LORA = RunSpec(lora=True, zero_stage=0, base_dtype="fp16", optimizer_source="client")
HEALTHY = dict(
    trainable_dtypes=["torch.float32"], frozen_dtypes=["torch.float16"], stepped_dtypes=["torch.float32"],
    optimizer_state_dtypes=["torch.float32"], optimizer="AdamW", frozen_checksum_start="base0",
    frozen_checksum_end="base0", lora_b_still_zero=[], merge_logits_rel_error=1e-3,
)


def lora_trace(**meta):
    return make_trace(spec=LORA, meta={**HEALTHY, **meta})


@pytest.mark.parametrize("name", ["adapter_dtype_policy", "frozen_base_unchanged", "adapters_learn", "merged_logits_match"])
def test_healthy_adapters_pass(name):
    assert check(lora_trace(), None, (name,))[0].status == "pass"


@pytest.mark.parametrize("name, meta, words", [
    ("adapter_dtype_policy", dict(stepped_dtypes=["torch.float16"], optimizer_state_dtypes=["torch.float16"]), "pure-torch.float16"),
    ("frozen_base_unchanged", dict(frozen_checksum_end="base1"), "base0 -> base1"),
    ("adapters_learn", dict(lora_b_still_zero=["q_proj.lora_B.default.weight"]), "still all zero"),
    ("merged_logits_match", dict(merge_logits_rel_error=0.5), "0.5"),
    ("merged_logits_match", dict(merge_logits_rel_error=math.nan), "nan"),
])
def test_adapter_bug_fails_with_the_evidence(name, meta, words):
    verdict = check(lora_trace(**meta), None, (name,))[0]
    assert verdict.status == "fail" and words in verdict.message, verdict.message


def test_adapters_that_stop_moving_fail_at_that_step():
    trace = lora_trace()
    for record in trace.steps:
        record.update_norm = 0.01
    trace.steps[6].update_norm = 0.0
    verdict = check(trace, None, ("adapters_learn",))[0]
    assert verdict.status == "fail" and verdict.step == 6


def test_full_fine_tuning_cells_are_not_applicable():
    assert {v.status for v in check(make_trace(), None, ("adapter_dtype_policy", "adapters_learn"))} == {"n/a"}
