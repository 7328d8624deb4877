"""The adapter-dtype cell on the real releases, not only on the emulation in faults.py:
under PEFT 0.7.0 (adapters created in the fp16 base dtype, stepped by a client AdamW)
it turns red through adapter_dtype_policy and finite; under PEFT 0.6.2 (fp32 adapters)
it stays green. Both run with transformers 4.36.2 pinned, each in its own environment
(numerics.versions), built here on first use and cached in the clone: CI starts on a
fresh machine. Their co-dependencies (tokenizers 0.15, ...) are resolved, not written."""

import pytest

from numerics.cell.faults import FAULTS
from numerics.cell.matrix import fault_cell
from numerics.run.platform import package_versions
from numerics.show.plugin import worker_index
from numerics.versions.cells import run_cells_in
from numerics.versions.environments import Environment, build
from numerics.versions.resolve import Pin, parse_pins

pytestmark = pytest.mark.multigpu

# The clean twin of the emulated fault: the same cell, with today's emulation switched off,
# so the real release alone decides the adapters' dtype.
CELL = fault_cell(FAULTS["adapters_in_base_dtype"], clean=True)
TIMEOUT_S = 600.0


def run_release(peft: str, request: pytest.FixtureRequest) -> tuple[dict, tuple[Pin, ...]]:
    pins = parse_pins([f"peft=={peft}", "transformers==4.36.2"])
    environment = build(pins)
    [record] = run_cells_in(environment, [CELL], TIMEOUT_S, backend=request.config.getoption("backend"),
                            worker=worker_index(request.config))
    story = "\n".join(f"  {status:5s} {invariant}: {message}" for invariant, status, message in record["verdicts"])
    record["story"] = f"{record['cell']} under {environment.path} {pins}: {record['status']}\n" \
                      f"losses: {record['losses']}\nadapter: {record['adapter']}\nerror: {record['error']}\n{story}"
    assert_ran_the_release(record, pins, environment)
    return record, pins


def assert_ran_the_release(record: dict, pins: tuple[Pin, ...], environment: Environment) -> None:
    """The ranks (not only the subprocess) saw the pinned releases from the environment and the
    main venv's torch and DeepSpeed."""
    seen = record["versions"]
    assert seen is not None, record["story"]
    for pin in pins:
        assert seen[pin.name] == pin.version, (pin, seen)
        assert record["modules"][pin.name]["from_overlay"], record["modules"][pin.name]
    main = package_versions()
    for package in ("torch", "deepspeed"):
        assert seen[package] == main[package], (package, seen, main)
        assert not record["modules"][package]["from_overlay"], record["modules"][package]
    assert any(name.startswith("tokenizers==0.15.") for name in environment.record["install"]), environment.record


def statuses(record: dict) -> dict[str, str]:
    return {invariant: status for invariant, status, _ in record["verdicts"]}


def test_peft_0_6_2_keeps_adapters_fp32_and_the_cell_green(request):
    record, _ = run_release("0.6.2", request)
    assert record["status"] == "pass", record["story"]
    assert statuses(record)["adapter_dtype_policy"] == "pass", record["story"]
    assert record["adapter"]["trainable_dtypes"] == ["torch.float32"], record["story"]


def test_peft_0_7_0_adapters_in_fp16_turn_the_cell_red(request):
    record, _ = run_release("0.7.0", request)
    assert record["status"] == "fail", record["story"]
    failed = {invariant for invariant, status in statuses(record).items() if status == "fail"}
    assert {"adapter_dtype_policy", "finite"} <= failed, record["story"]
    assert "completes" not in failed, record["story"]  # it trains to the end; the numbers are what break
    assert record["adapter"]["trainable_dtypes"] == ["torch.float16"], record["story"]
