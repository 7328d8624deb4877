"""SIGTERM mid-run (a CI job cancelled): ``numerics run`` and a pytest session stop, their ranks
end, and the report is written with the cells that finished."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import descendants

from numerics.cell import matrix

pytestmark = pytest.mark.multigpu

# Three cheap default cells: SIGTERM lands after the first, before the last.
CELLS = ["zero0-fp32-ws2", "zero1-fp32-comm_fp32-ws2", "zero2-fp32-comm_fp16-ws2"]
RUN_CELLS = "zero[0-2]-fp32-*ws2"  # numerics run's selection: 12 cells, of which one job or two finish a few


def terminate_after_first_cell(command: list[str], finished: str) -> tuple[subprocess.Popen, str, set[int]]:
    """Start ``command``, SIGTERM it once a line containing ``finished`` shows, wait for it;
    returns the process, its output, and the processes it had started."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    output = []
    for line in process.stdout:
        output.append(line)
        if finished in line:
            break
    ranks = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    output.append(process.communicate(timeout=120)[0])
    return process, "".join(output), ranks


def assert_ranks_ended(ranks: set[int]) -> None:
    deadline = time.monotonic() + 30
    while ranks & descendants(1) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ranks, "the run had started no ranks when it was stopped"
    assert not ranks & descendants(1), f"processes {sorted(ranks & descendants(1))} outlived the stopped run"


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_numerics_run_writes_the_partial_report(jobs, tmp_path):
    """With --jobs 2 the parent stops both jobs, each writes its part, and the parts are merged."""
    process, output, ranks = terminate_after_first_cell(
        [sys.executable, "-m", "numerics.show.cli", "run", "--jobs", jobs, "--cells", RUN_CELLS,
         "--report", str(tmp_path)],
        "pass  zero0-fp32-ws2  (")
    assert process.returncode == 130, output[-3000:]
    assert "interrupted (signal SIGTERM)" in output
    cells = {c["cell"]: c["status"] for c in json.loads((tmp_path / "results.json").read_text())["cells"]}
    assert 1 <= len(cells) < len(matrix.cells(pattern=RUN_CELLS)) and cells.get("zero0-fp32-ws2") == "pass", cells
    assert_ranks_ended(ranks)


def test_pytest_session_writes_the_partial_report(tmp_path):
    ids = [f"tests/test_matrix.py::test_cell[{cell}]" for cell in CELLS]
    process, output, ranks = terminate_after_first_cell(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--numerics-report", str(tmp_path), *ids],
        "PASSED")
    assert process.returncode != 0 and "KeyboardInterrupt" in output, output[-3000:]
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert 1 <= len(cells) < len(CELLS) and cells[0]["status"] == "pass", [c["cell"] for c in cells]
    assert_ranks_ended(ranks)
