"""End-to-end detection power: each fault, injected into a real run, is caught by the
invariant it targets (not merely by ``finite``), and the same cell without it passes."""
import pytest

from numerics.cell.faults import FAULTS, UNDETECTED
from numerics.cell.matrix import fault_cell, fault_precisions

pytestmark = pytest.mark.multigpu

CASES = [pytest.param(name, precision, id=f"{name}-{precision}", marks=[
             pytest.mark.xfail(strict=True, reason=UNDETECTED[name, precision])] if (name, precision) in UNDETECTED else [])
         for name, fault in FAULTS.items() for precision in fault_precisions(fault)]


@pytest.mark.parametrize("name, precision", CASES)
def test_fault_is_caught_by_its_target(name, precision, run_cell):
    fault = FAULTS[name]
    faulty = run_cell(fault_cell(fault, precision=precision))
    fired = {v.invariant for v in faulty.verdicts if v.failed}
    assert fired & set(fault.targets), f"{name} went undetected; fired: {sorted(fired)}\n{faulty.story()}"
    if not {"completes", "finite"} & set(fault.targets):
        assert "finite" not in fired, f"{name} should stay finite, as the real bug did\n{faulty.story()}"
    clean = run_cell(fault_cell(fault, clean=True, precision=precision), reuse=True)
    assert clean.status != "fail", clean.story()
