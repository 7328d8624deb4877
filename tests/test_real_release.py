"""The adapter-dtype cell on the real releases, not only on the emulation in faults.py:
under PEFT 0.7.0 (adapters created in the fp16 base dtype, stepped by a client AdamW)
it turns red through adapter_dtype_policy and finite; under PEFT 0.6.2 (fp32 adapters)
it stays green. Both run with transformers 4.36.2, each in its own overlay
(numerics.sideenv), installed here on first use: CI starts on a fresh machine."""
import os

import pytest

from numerics.faults import FAULTS
from numerics.platform import package_versions
from numerics.selftest import fault_cell
from numerics.sideenv import SideEnvError, VersionSet, VERSION_SETS, ensure_overlay, run_cells_in

pytestmark = pytest.mark.multigpu

# The clean twin of the emulated fault: the same cell, with today's emulation switched off,
# so the real release alone decides the adapters' dtype.
CELL = fault_cell(FAULTS["adapters_in_base_dtype"], clean=True)
TIMEOUT_S = 600.0


def _worker() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name.startswith("gw") else 0


def run_release(name: str, request: pytest.FixtureRequest) -> dict:
    vset = VERSION_SETS[name]
    [record] = run_cells_in(vset, [CELL], TIMEOUT_S, backend=request.config.getoption("backend"), worker=_worker())
    story = "\n".join(f"  {status:5s} {invariant}: {message}" for invariant, status, message in record["verdicts"])
    record["story"] = f"{record['cell']} under {name}: {record['status']}\nlosses: {record['losses']}\n" \
                      f"adapter: {record['adapter']}\nerror: {record['error']}\n{story}"
    return record


def assert_ran_the_release(record: dict, vset: VersionSet) -> None:
    """The ranks (not only the subprocess) saw the overlay's releases and the main venv's torch/DeepSpeed."""
    seen = record["versions"]
    assert seen is not None, record["story"]
    for package in ("peft", "transformers", "accelerate"):
        assert seen[package] == vset.pinned(package), (package, seen)
        assert record["modules"][package]["from_overlay"], record["modules"][package]
    main = package_versions()
    for package in ("torch", "deepspeed"):
        assert seen[package] == main[package], (package, seen, main)
        assert not record["modules"][package]["from_overlay"], record["modules"][package]


def statuses(record: dict) -> dict[str, str]:
    return {invariant: status for invariant, status, _ in record["verdicts"]}


def test_peft_0_6_2_keeps_adapters_fp32_and_the_cell_green(request):
    record = run_release("peft-0.6.2", request)
    assert_ran_the_release(record, VERSION_SETS["peft-0.6.2"])
    assert record["status"] == "pass", record["story"]
    assert statuses(record)["adapter_dtype_policy"] == "pass", record["story"]
    assert record["adapter"]["trainable_dtypes"] == ["torch.float32"], record["story"]


def test_peft_0_7_0_adapters_in_fp16_turn_the_cell_red(request):
    record = run_release("peft-0.7.0", request)
    assert_ran_the_release(record, VERSION_SETS["peft-0.7.0"])
    assert record["status"] == "fail", record["story"]
    failed = {invariant for invariant, status in statuses(record).items() if status == "fail"}
    assert {"adapter_dtype_policy", "finite"} <= failed, record["story"]
    assert "completes" not in failed, record["story"]  # it trains to the end; the numbers are what break
    assert record["adapter"]["trainable_dtypes"] == ["torch.float16"], record["story"]


def test_a_pin_pip_cannot_find_is_named(tmp_path):
    bogus = VersionSet("bogus", ("peft==0.6.99",))
    with pytest.raises(SideEnvError, match=r"'bogus'.*peft==0\.6\.99"):
        ensure_overlay(bogus, root=tmp_path)
    assert not (tmp_path / "bogus").exists()  # nothing half-installed is left to be taken for an overlay
