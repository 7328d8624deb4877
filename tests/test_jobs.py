"""``numerics run --jobs N``: the selection split into N shards run at once, merged into one
report with the same verdicts and traces as one run; bad combinations refused up front."""
import json
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("arguments, message", [
    (["--jobs", "0"], "is not a whole number of at least 1"),
    (["--jobs", "2", "--shard", "1/2"], "--jobs splits the selection into shards itself"),
])
def test_bad_job_counts_are_refused(arguments, message, tmp_path):
    done = numerics_run(*arguments, "--cells", CELLS, "--report", str(tmp_path))
    assert done.returncode == 2 and message in done.stdout + done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "results.json").exists()
