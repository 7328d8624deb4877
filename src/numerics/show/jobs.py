"""``numerics run --jobs N``: one selection as N cost-balanced shards, each a ``numerics run``
of its own (its own rank pool), at once; their reports merged into one.

On 2 cores one pool keeps the cores ~72 % busy: its ranks wait in gloo collectives. A second
pool's ranks fill that time: the default matrix took 224 s instead of 276 s on two jobs
(2026-12-02). Each job is the plain run path, interrupt and partial report included, so a job
adds no new way to fail: its cells' lines stream through this process's progress bar, its whole
output goes to ``DIR/jobs/I/output.txt``, and whatever the jobs wrote is merged on Ctrl-C or
SIGTERM too. A job also stops that way by itself when this process is gone, even killed with
SIGKILL: its stdin is a pipe only this process writes, and end-of-file there is the signal
(`exit_with_parent`), as the ranks' lifeline is for their pool. Not for GPUs: every job's pools
would take the same devices.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from numerics.run.runner import INTERRUPTED_EXIT, interrupt_on_sigterm
from numerics.show import report, results

CELL_LINE = re.compile(r"^(pass|fail|xfail|cannot run|cannot build)\s+\S+\s+\(")  # cli.run_cells' line per cell


def job_command(arguments: list[str], job: int, jobs: int, directory: Path) -> list[str]:
    """The ``numerics run`` of one job: the user's selection, its shard, its own report directory,
    and ``--job``: it ends with this process (`exit_with_parent`) and leaves the curves of passing
    cells to the merged report."""
    return [sys.executable, "-m", "numerics.show.cli", "run", *arguments, "--shard", f"{job}/{jobs}",
            "--report", str(directory), "--job"]


def exit_with_parent(lifeline: int) -> None:
    """Interrupt this job once the process that started it is gone, however it ended: a daemon
    thread reads the file descriptor ``lifeline`` (stdin, a pipe only the parent writes, never) to
    end-of-file, then silences the output nobody reads any more and sends this process SIGTERM,
    which ends it as Ctrl-C does: its pool closes, its ranks end, its partial report is written.
    It reads the descriptor, not ``sys.stdin``: a thread blocked inside the buffered reader holds
    its lock, and the interpreter aborts on that lock at exit."""

    def watch() -> None:
        while os.read(lifeline, 1024):
            pass
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def relay(job: int, stream: IO[str], log: Path, lines: queue.SimpleQueue) -> None:
    """Copy a job's output to its log and hand each line to the parent; None when it ends."""
    with log.open("w") as out:
        for line in stream:
            out.write(line)
            lines.put((job, line.rstrip("\n")))
    lines.put((job, None))


def run_jobs(arguments: list[str], jobs: int, total: int, directory: Path, console: Console) -> int:
    """Run the selection ``arguments`` names (``total`` cells) as ``jobs`` shards at once and
    merge their reports into ``directory``; exit as one run would (130 if interrupted)."""
    interrupt_on_sigterm()
    dirs = [directory / "jobs" / str(job) for job in range(1, jobs + 1)]
    lines: queue.SimpleQueue = queue.SimpleQueue()
    processes = []
    for job, job_dir in enumerate(dirs, 1):
        job_dir.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(job_command(arguments, job, jobs, job_dir), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=relay, args=(job, process.stdout, job_dir / "output.txt", lines), daemon=True).start()
        processes.append(process)
    interrupted = follow(lines, jobs, total, console, processes)
    codes = [process.wait() for process in processes]
    written = [d for d in dirs if (d / "results.json").exists()]
    if not written:
        console.print(f"no job wrote a report; their output: {', '.join(str(d / 'output.txt') for d in dirs)}")
        return 2
    data = report.merge([results.load(d) for d in written])
    report.write_data(data, directory)
    console.print(data["summary"], highlight=False)
    console.print(f"wrote {directory}/results.json, junit.xml and report.html ({jobs} jobs: {directory}/jobs)")
    if interrupted or len(written) < jobs or INTERRUPTED_EXIT in codes:
        return INTERRUPTED_EXIT
    return 1 if report.failed(data) or any(code not in (0, 1) for code in codes) else 0


def follow(lines: queue.SimpleQueue, jobs: int, total: int, console: Console, processes: list[subprocess.Popen]) -> bool:
    """Show each finished cell as the jobs report it, until every job's output ends; on Ctrl-C or
    SIGTERM stop the jobs (each writes its partial report) and return True."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    running = jobs
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"matrix ({jobs} jobs)", total=total)
        try:
            while running:
                job, line = lines.get()
                if line is None:
                    running -= 1
                elif CELL_LINE.match(line):
                    progress.console.print(f"{line}  [job {job}]", highlight=False, markup=False)
                    progress.advance(task)
        except KeyboardInterrupt as stop:
            progress.console.print(f"[bold yellow]interrupted ({stop or 'Ctrl-C'})[/]: stopping the jobs; the report holds what finished")
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            return True
    return False
