"""The rank pool: cells after a fault or a failure run as in a fresh spawn, bit for bit;
a hung cell fails within its timeout with every rank's stacks, a killed rank within seconds;
fp32 is reproducible; a closed pool leaves no process or file behind."""
import os

import pytest
from conftest import PROBE, descendants, outlive

from numerics.run.launcher import RankPool
from numerics.run.runner import PoolSet

pytestmark = pytest.mark.multigpu


def fingerprint(result) -> list[tuple]:
    trace = result.outcome.trace
    assert trace is not None, result.story()
    return [(s.loss, s.grad_norm, tuple(s.param_checksums)) for s in trace.steps]


@pytest.fixture(scope="module")
def fresh_probe():
    with RankPool(PROBE.world_size) as pool:
        outcome = pool.run(PROBE)
    assert outcome.ok, outcome.error
    return [(s.loss, s.grad_norm, tuple(s.param_checksums)) for s in outcome.trace.steps]


@pytest.mark.parametrize("fault", ["rank_skips_reduction", "causal_mask_leak", "rank_raises", "grad_not_divided_by_ws"])
def test_cell_after_fault_matches_fresh_spawn(fault, run_cell, fresh_probe):
    run_cell(PROBE.with_(fault=fault, zero_stage=0 if fault == "rank_skips_reduction" else 2, steps=3))
    assert fingerprint(run_cell(PROBE)) == fresh_probe


def test_fp32_trace_is_bit_identical_twice(run_cell):
    assert fingerprint(run_cell(PROBE)) == fingerprint(run_cell(PROBE))


def test_hung_cell_fails_within_timeout_with_stacks(run_cell):
    hung = run_cell(PROBE.with_(fault="rank_hangs", timeout_s=8.0))
    assert hung.outcome.timed_out and hung.status == "fail"
    assert hung.outcome.wall_s < 8.0 + 5.0
    assert "rank 0 stacks" in hung.outcome.error and "on_reduced" in hung.outcome.error, hung.outcome.error
    assert run_cell(PROBE).status == "pass"


def test_killed_rank_fails_its_cell_at_once_naming_the_signal(run_cell):
    killed = run_cell(PROBE.with_(fault="rank_killed", timeout_s=120.0))
    error = killed.outcome.error
    assert killed.status == "fail" and not killed.outcome.timed_out, error
    assert killed.outcome.wall_s < 15.0, f"a dead rank was noticed only after {killed.outcome.wall_s:.0f}s (timeout 120s)"
    assert "rank 0 died: killed by signal SIGKILL" in error, error
    assert "rank 1" in error, f"the survivor's traceback or stacks come along:\n{error}"
    assert run_cell(PROBE).status == "pass"


def test_a_closed_pool_leaves_no_process_or_file_behind():
    """Nor DeepSpeed's 66 MB shared-memory workspace per rank (RAM, in /dev/shm), nor the stacks' directory."""
    from multiprocessing import forkserver, resource_tracker

    from numerics.run.platform import SHARED_MEMORY

    pool = RankPool(PROBE.world_size)
    # multiprocessing's own helpers: one each per parent process, for its lifetime, by design
    resource_tracker.ensure_running()
    forkserver.ensure_running()  # the ranks' parent
    before, segments = descendants(os.getpid()), set(SHARED_MEMORY.glob("deepspeed_*"))
    with pool:
        assert pool.run(PROBE).ok
        assert descendants(os.getpid()) - before, "the pool's ranks run under this process"
        stack_dir = pool._stack_dir
    left = descendants(os.getpid()) - before
    assert not left, f"still running after the pool closed: {left}"
    assert not set(SHARED_MEMORY.glob("deepspeed_*")) - segments, "shared-memory segments left in /dev/shm"
    assert not stack_dir.exists(), f"{stack_dir} left behind"


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "hung_in_a_cell"])
def test_ranks_exit_when_the_parent_is_killed(busy):
    """A parent killed with SIGKILL cannot tell its ranks to stop: they notice and exit, idle
    or hung mid-cell (``rank_hangs`` stops one rank inside a collective)."""
    import signal
    import subprocess
    import sys
    import time

    work = "pool.run(RunSpec(fault='rank_hangs', zero_stage=1, timeout_s=600.0))" if busy else "time.sleep(600)"
    script = ("import sys, time\nfrom numerics.run.launcher import RankPool\nfrom numerics.cell.spec import RunSpec\n"
              "pool = RankPool(2)\npool.start()\n"
              f"print('ranks:', *[p.pid for p in pool._processes], flush=True)\n{work}\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = next(line for line in parent.stdout if line.startswith("ranks:"))  # DeepSpeed prints too
    ranks = [int(pid) for pid in line.split()[1:]]
    assert len(ranks) == 2, ranks
    time.sleep(4 if busy else 0)  # well into the cell: built, stepping, one rank hung
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert not outlive(set(ranks), 30), f"ranks {ranks} outlived their killed parent"


def test_run_all_judges_each_cell_while_the_ranks_train_the_next(monkeypatch):
    """The parent's share of a cell (reference run, invariants) overlaps the next cell's training:
    cell i is judged after cell i+1 went to the ranks and before the parent waits for it."""
    events = []

    def submit(self, spec):
        events.append(("submit", spec.seed))
        return lambda: events.append(("collect", spec.seed)) or spec

    monkeypatch.setattr(PoolSet, "submit", submit)
    monkeypatch.setattr("numerics.run.runner.evaluate", lambda spec: events.append(("judge", spec.seed)) or spec)
    specs = [PROBE.with_(seed=seed) for seed in range(3)]
    assert [spec.seed for spec in PoolSet().run_all(specs)] == [0, 1, 2]
    assert events == [("submit", 0), ("collect", 0), ("submit", 1), ("judge", 0), ("collect", 1),
                      ("submit", 2), ("judge", 1), ("collect", 2), ("judge", 2)]

