"""Ranks started by torchrun as two simulated nodes (``--nnodes 2 --nproc-per-node 1`` on
localhost, gloo) run cells that match the same cells through our own pool, verdict for
verdict and bit for bit in fp32; a node that never joins, or dies mid-run, ends the run in
time with the reason; the DeepSpeed launcher's ranks run cells too."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import descendants

from numerics.cell.matrix import cells
from numerics.run.launcher import free_port

pytestmark = pytest.mark.multigpu

# One rank per node: two ranks on the 2-core baseline, and a rank's peer is always on the other
# node (its RANK and LOCAL_RANK differ), which is what crossing nodes changes.
PATTERN = "zero3-fp32-ws2"  # the stage that partitions most; one cell keeps the test short (and the matrix runs it)
SMALL = "zero3-fp32-ws2-overfit"  # 60 steps: still stepping when a node is lost
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--master-addr", "127.0.0.1"]


def node(rank: int, port: int, report: Path, join_timeout_s: int = 120, timeout_s: int = 120,
         cells: str = PATTERN) -> subprocess.Popen:
    """One simulated node: a torchrun agent and its rank."""
    return subprocess.Popen([*TORCHRUN, "--node-rank", str(rank), "--master-port",
                             str(port), "--rdzv-conf", f"timeout={join_timeout_s}", "-m", "numerics.show.cli", "launched",
                             "--cells", cells, "--report", str(report), "--timeout-s", str(timeout_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a torchrun agent and everything under it (it starts its ranks in sessions of their
    own, so no process group reaches them). A rank may be gone before its turn: ranks exit by
    themselves once the agent that owns them dies."""
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def fingerprint(cell: dict) -> list[tuple]:
    return [(s["loss"], s["grad_norm"], tuple(s["param_checksums"])) for s in cell["trace"]["steps"]]


def test_torchrun_two_nodes_match_the_pool_bit_for_bit(run_cell, tmp_path):
    port = free_port()
    nodes = [node(rank, port, tmp_path / "launched") for rank in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    launched = {c["cell"]: c for c in json.loads((tmp_path / "launched" / "results.json").read_text())["cells"]}
    specs = [spec for spec in cells() if spec.cell_id in launched]
    assert len(specs) == 1, sorted(launched)
    for spec in specs:
        pool = run_cell(spec, reuse=True)
        record = launched[spec.cell_id]
        assert record["status"] == pool.status == "pass", record["verdicts"]
        assert [v["status"] for v in record["verdicts"]] == [v.status for v in pool.verdicts]
        assert fingerprint(record) == [(s.loss, s.grad_norm, tuple(s.param_checksums)) for s in pool.outcome.trace.steps]


def test_a_node_that_never_joins_ends_the_run_with_the_reason(tmp_path):
    started = time.monotonic()
    lonely = node(0, free_port(), tmp_path / "launched", join_timeout_s=5, cells=SMALL)  # node 1 never comes
    output = lonely.communicate(timeout=120)[0]
    assert lonely.returncode != 0 and time.monotonic() - started < 60
    assert "1/2 clients joined" in output, output[-3000:]


def test_a_node_that_dies_mid_run_fails_its_cell_and_the_report_is_written(tmp_path):
    """Node 1 (its agent and rank) is killed once training started: node 0's rank waits for it
    no longer than the cell's timeout, and rank 0 writes the report with the cell failed. (Node 0's
    torchrun agent then waits at its exit barrier for the dead agent, up to torch's 300 s.)"""
    port = free_port()
    survivor = node(0, port, tmp_path / "launched", timeout_s=30, cells=SMALL)
    lost = node(1, port, tmp_path / "launched", timeout_s=30, cells=SMALL)
    for line in survivor.stdout:
        if "running " + SMALL in line:
            break
    time.sleep(3)  # the ZeRO-3 engine built, stepping
    kill_tree(lost.pid)
    killed = time.monotonic()
    results = tmp_path / "launched" / "results.json"
    while not results.exists() and time.monotonic() - killed < 150:
        time.sleep(1)
    kill_tree(survivor.pid)
    output = survivor.communicate()[0]
    assert results.exists(), f"no report {time.monotonic() - killed:.0f}s after node 1 died:\n{output[-3000:]}"
    cells = json.loads(results.read_text())["cells"]
    assert [c["status"] for c in cells] == ["fail"], output[-3000:]
    # gloo ends rank 0's collective at once when its one peer's connection closes (two ranks per
    # node: the local peer keeps it waiting, and the watchdog ends the cell at its timeout).
    assert f"{SMALL}: the launcher's ranks sent no result" in output, output[-3000:]


def test_the_deepspeed_launcher_starts_ranks_that_run_cells(tmp_path):
    """``deepspeed --module numerics.show.cli launched`` (one node here; ``--hostfile`` for many)."""
    done = subprocess.run([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                           str(free_port()), "--module", "numerics.show.cli", "launched", "--cells", "zero0-fp32-ws2",
                           "--report", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert [(c["cell"], c["status"]) for c in cells] == [("zero0-fp32-ws2", "pass")]
