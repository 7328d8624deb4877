"""``numerics run --jobs N``: the selection split into N shards run at once, merged into one
report with the same verdicts and traces as one run; bad combinations refused up front."""
import json
import signal
import subprocess
import sys

import pytest
from conftest import descendants, outlive

CELLS = "zero0-fp32-*ws2"  # ZeRO-0 fp32 with each communication dtype: a second each


def numerics_run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "numerics.show.cli", "run", *arguments],
                          capture_output=True, text=True, timeout=600)


def cells(directory) -> dict[str, dict]:
    return {c["cell"]: c for c in json.loads((directory / "results.json").read_text())["cells"]}


@pytest.mark.multigpu
def test_two_jobs_merge_into_the_report_one_run_writes(tmp_path):
    one = numerics_run("--cells", CELLS, "--report", str(tmp_path / "one"))
    two = numerics_run("--jobs", "2", "--cells", CELLS, "--report", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-3000:]
    alone, merged = cells(tmp_path / "one"), cells(tmp_path / "two")
    assert sorted(merged) == sorted(alone) and len(merged) >= 2, sorted(merged)
    for cell, record in alone.items():
        assert merged[cell]["status"] == record["status"], cell
        assert [s["loss"] for s in merged[cell]["trace"]["steps"]] == [s["loss"] for s in record["trace"]["steps"]], cell
    parts = [cells(tmp_path / "two" / "jobs" / str(job)) for job in (1, 2)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1]), "each job ran its own shard"
    assert "[job 1]" in two.stdout and "[job 2]" in two.stdout, two.stdout[-3000:]
    assert (tmp_path / "two" / "jobs" / "1" / "output.txt").read_text(), "each job's whole output is kept"
    curves = 'class="curves"'  # a passing cell's figure: drawn once, on the merged page, not on the jobs'
    assert curves in (tmp_path / "two" / "report.html").read_text()
    assert curves not in (tmp_path / "two" / "jobs" / "1" / "report.html").read_text()


@pytest.mark.parametrize("arguments, message", [
    (["--jobs", "0"], "is not a whole number of at least 1"),
    (["--jobs", "2", "--shard", "1/2"], "--jobs splits the selection into shards itself"),
])
def test_bad_job_counts_are_refused(arguments, message, tmp_path):
    done = numerics_run(*arguments, "--cells", CELLS, "--report", str(tmp_path))
    assert done.returncode == 2 and message in done.stdout + done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.multigpu
def test_jobs_stop_when_their_parent_is_killed(tmp_path):
    """A parent killed with SIGKILL cannot stop its jobs: each notices, ends as if interrupted
    (its pool and ranks with it) and leaves its partial report, instead of dying of a broken
    pipe at its next line of output with nothing written."""
    parent = subprocess.Popen([sys.executable, "-m", "numerics.show.cli", "run", "--jobs", "2", "--cells", "zero3-*-ws2*",
                               "--report", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = next(line for line in parent.stdout if "[job " in line)  # a pool runs: jobs, fork servers, ranks
    tree = descendants(parent.pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert not outlive(tree, 30), f"still running 30 s after their parent was killed (after {first!r})"
    for job in (1, 2):
        partial = json.loads((tmp_path / "jobs" / str(job) / "results.json").read_text())
        assert len(partial["cells"]) < 24, f"job {job} ran its whole shard"
