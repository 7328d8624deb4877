"""`RankPool`: a persistent group of ranks that runs cell after cell.

Starting ranks (imports, DeepSpeed's CPU ops, the process group) costs seconds, far more
than a tiny cell trains, so the ranks stay up and take cells from a queue. A
cell that raises returns every rank's traceback; a rank that dies (killed, or
exits) is noticed within seconds and named with how it ended; a cell that hangs
is stopped at its timeout. With the last two, the surviving ranks' Python stacks
(faulthandler) come along. Either way the pool is torn down and rebuilt on a
fresh port, and the next cell runs clean. A pool that cannot start is retried
once on a fresh port. Verdicts come from what ranks sent, never from exit codes:
ZeRO-3 teardown can abort a process after its results are complete.
"""
from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from numerics.cell.spec import RunSpec
from numerics.judge.trace import Trace

ERROR_GRACE_S = 3.0  # after one rank fails, how long the others get to report before they are stopped
START_TIMEOUT_S = 300.0  # importing DeepSpeed and building its CPU comm op on a cold machine
STACK_DUMP_WAIT_S = 1.0
CLOSE_GRACE_S = 10.0  # how long idle ranks of a pool being closed get to leave before they are killed
QUEUE_POLL_S = 1.0  # how often the parent, waiting for replies, checks that every rank still lives
# After a rank dies without replying, how long the queue is still read: what a rank sent just
# before it ended is still in flight (a rank may exit right after its reply).
DEATH_DRAIN_S = 1.0
# A start that fails is retried once on a fresh port: the port `free_port` picked may have been
# taken by another program before rank 0 bound it.
START_ATTEMPTS = 2


@dataclass
class CellOutcome:
    spec: RunSpec
    trace: Trace | None = None
    error: str | None = None  # tracebacks of the ranks that raised, or the timeout with stacks
    # ("cannot run" | "cannot build", why): the release lacks an API the cell needs (compat.Unsupported),
    # or its environment could not be built; nothing trained, so there is nothing to judge
    cannot: tuple[str, str] | None = None
    timed_out: bool = False
    wall_s: float = 0.0
    rank_errors: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.trace is not None and self.error is None


class PoolStartError(RuntimeError):
    """The ranks could not be started; the message holds every attempt's tracebacks and stacks."""


def free_port() -> int:
    """A port free at the time of asking. The socket closes before rank 0 binds the port, so
    another program can take it in between; that race cannot be closed from here (the rank,
    not this process, has to bind it), so `RankPool.start` retries on a fresh port instead."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_description(code: int | None) -> str:
    """How a process ended, from ``Process.exitcode``: negative is the signal that killed it."""
    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by signal {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def failure_report(world_size: int, replies: dict[int, tuple[str, Any]], died: dict[int, str],
                   waited_s: float, timeout_s: float) -> list[str]:
    """One paragraph per rank that failed: died (how; first, as the others' errors and hangs
    follow from it), raised (its traceback), or stayed silent."""
    parts = [f"rank {rank} died: {how}" for rank, how in sorted(died.items())]
    parts += [f"rank {rank} raised:\n{text}" for rank, (status, text) in sorted(replies.items()) if status != "ok"]
    silent = sorted(set(range(world_size)) - set(replies) - set(died))
    if silent:
        parts.append(f"ranks {silent} sent no result in {waited_s:.1f}s (timeout {timeout_s:.0f}s)")
    return parts


def outcome_of(spec: RunSpec, replies: dict[int, tuple[str, Any]], world_size: int, wall_s: float,
               died: dict[int, str] | None = None) -> CellOutcome:
    """A cell's outcome from its ranks' replies (`reply_for`), by rank: the merged trace when
    every rank sent one, "cannot run" when every rank stopped at the same missing API, else
    the failure report of the ranks that died, raised or stayed silent."""
    outcome = CellOutcome(spec=spec, wall_s=wall_s)
    unsupported = {text for status, text in replies.values() if status == "unsupported"}
    if unsupported and len(replies) == world_size and all(s == "unsupported" for s, _ in replies.values()):
        outcome.cannot = ("cannot run", "; ".join(sorted(unsupported)))  # every rank stopped at the same missing API
        return outcome
    outcome.rank_errors = {rank: text for rank, (status, text) in replies.items() if status != "ok"}
    missing = sorted(set(range(world_size)) - set(replies))
    if missing or outcome.rank_errors:
        died = died or {}
        outcome.timed_out = bool(missing) and not outcome.rank_errors and not died
        outcome.error = "\n".join(failure_report(world_size, replies, died, wall_s, spec.timeout_s))
        return outcome
    outcome.trace = merge_rank_traces([replies[r][1] for r in range(world_size)])
    return outcome


def _rank_main(rank: int, world_size: int, port: int, backend: str, device_offset: int,
               tasks: Any, results: Any, stack_file: str, environment: dict[str, str], lifeline: Any) -> None:
    """Body of one rank: start the process group once, then run cells until told to stop.
    ``environment`` is the owner's at the pool's start: the fork server's dates from its own."""
    from numerics.run.platform import rank_environment

    exit_with_owner(lifeline)
    os.environ.clear()
    os.environ.update(environment | rank_environment(rank, world_size, port, backend))
    stacks = open(stack_file, "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        meta = start_rank(world_size, device_offset + rank, backend)
    except BaseException:
        results.put(("start", rank, "error", traceback.format_exc()))
        return
    results.put(("start", rank, "ok", None))
    while (task := tasks.get()) is not None:
        number, spec = task
        results.put((number, rank, *reply_for(spec, rank, meta)))


def start_rank(world_size: int, device: int, backend: str,
               timeout: datetime.timedelta = datetime.timedelta(seconds=600)) -> dict[str, Any]:
    """Join the process group (its address in the environment, from our pool or a launcher)
    and return the run's metadata. ``timeout`` bounds every collective, joining included
    (DeepSpeed's default here; a launched run sets its own)."""
    import torch

    torch.set_num_threads(1)  # 2 cores, and bit-reproducibility depends on the thread count
    import deepspeed

    from numerics.run.platform import lift_cpu_fp16_check, quiet_libraries, release_shm_workspace, run_metadata

    quiet_libraries()
    lifted = lift_cpu_fp16_check()
    if backend == "gloo":
        from numerics.run.prepare import build_cpu_ops

        build_cpu_ops()  # each op under its file lock: on a cold cache one rank builds it, the others load it
    if backend == "nccl":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    if backend == "gloo":
        release_shm_workspace()
    import numerics.run.preload  # noqa: F401 - held by forks of the server already; spawned and launched ranks too
    return run_metadata(backend, world_size, lifted)


def reply_for(spec: RunSpec, rank: int, meta: dict[str, Any]) -> tuple[str, Any]:
    """What a rank sends back for one cell: ("ok", its trace), ("unsupported", the missing
    API) or ("error", its traceback)."""
    from numerics.run.drivers import run_cell
    from numerics.versions.compat import Unsupported

    try:
        return "ok", run_cell(spec, rank, meta)
    except Unsupported as err:
        return "unsupported", str(err)
    except BaseException:  # noqa: BLE001 - the traceback is the verdict's message
        return "error", traceback.format_exc()


def rank_context(backend: str, fresh: bool = False) -> Any:
    """Gloo ranks are forks of a server that imported `numerics.run.preload` (multiprocessing's
    "forkserver": one per parent process, started with its first pool): a pool starts in ~1 s
    of imports instead of ~5, and nothing is forked from a parent that may hold threads. NCCL
    ranks are spawned fresh: a CUDA driver that any import initialised in the server would be
    unusable in its forks. ``fresh`` spawns gloo ranks too: what a pool saves, measured
    (benchmarks/throughput.py)."""
    if backend == "nccl" or fresh:
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["numerics.run.preload"])
    return context


def exit_with_owner(lifeline: Connection) -> None:
    """Exit this rank once the process that owns its pool is gone. An owner killed with SIGKILL
    cannot tell its ranks to stop, and a rank may be anywhere then: idle, hung in a collective,
    waiting on a JIT build's lock. A daemon thread notices wherever the main thread is.

    ``lifeline`` is the read end of a pipe whose write end only the owner holds: it reads
    end-of-file when the owner ends, however it ends. (The rank's parent is the fork server,
    which every rank keeps alive, so a change of parent would never come.)"""

    def watch() -> None:
        try:
            lifeline.recv()  # nothing is ever sent
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


class RankPool:
    """``world_size`` ranks on one backend, started lazily and rebuilt after a failure."""

    def __init__(self, world_size: int, backend: str | None = None, device_offset: int = 0, fresh: bool = False) -> None:
        """``fresh``: ranks are new interpreters (`rank_context`), not forks of the preloaded server."""
        from numerics.run.platform import choose_backend

        self.world_size = world_size
        self.backend = backend or choose_backend(world_size)
        self.device_offset = device_offset  # first GPU of this pool: pytest-xdist workers get disjoint GPUs
        self._context = rank_context(self.backend, fresh)
        self._processes: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._lifeline: Connection | None = None  # its end-of-file tells the ranks this process is gone
        self._stack_dir = Path(tempfile.mkdtemp(prefix="numerics-stacks-"))
        self._counter = 0
        self._in_flight: tuple[int, RunSpec, float] | None = None  # the cell submitted: number, spec, when
        self.generation = 0  # how many times the ranks were (re)started

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the ranks, each attempt on a fresh port; raise `PoolStartError` with every
        attempt's story if none succeeds."""
        failures = []
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return self._start_once()
            except PoolStartError as err:
                failures.append(f"attempt {attempt}: {err}")
        raise PoolStartError(f"rank pool failed to start (ws={self.world_size}, {self.backend}):\n" + "\n".join(failures))

    def _start_once(self) -> None:
        port = free_port()
        self.generation += 1
        self._stack_dir.mkdir(exist_ok=True)  # a closed pool that runs again
        self._results = self._context.Queue()
        self._tasks = [self._context.Queue() for _ in range(self.world_size)]
        self._processes = []
        lifeline, self._lifeline = self._context.Pipe(duplex=False)
        for rank in range(self.world_size):
            stack_file = str(self._stack_dir / f"gen{self.generation}-rank{rank}.txt")
            process = self._context.Process(
                target=_rank_main,
                args=(rank, self.world_size, port, self.backend, self.device_offset,
                      self._tasks[rank], self._results, stack_file, dict(os.environ), lifeline),
                daemon=True,
                name=f"numerics-rank{rank}",
            )
            process.start()
            self._processes.append(process)
        lifeline.close()  # the ranks hold the read end; the owner only the write end
        started = time.monotonic()
        # A rank that fails to start (rank 0 cannot bind the port) leaves the others waiting for it
        # in the rendezvous: they get the grace, not the whole start timeout.
        replies = self._collect("start", START_TIMEOUT_S)
        if len(replies) < self.world_size or any(status != "ok" for status, _ in replies.values()):
            died = self._dead_without_reply(replies)
            parts = failure_report(self.world_size, replies, died, time.monotonic() - started, START_TIMEOUT_S)
            stacks = self._stop(dump_stacks=len(replies) < self.world_size)
            raise PoolStartError(f"port {port}:\n" + "\n".join(parts) + stacks)

    def close(self) -> None:
        """Let idle ranks leave on their own (up to `CLOSE_GRACE_S`); a cell still in flight
        (closed on Ctrl-C or SIGTERM) is abandoned at once, its ranks killed: nobody waits for it."""
        if self._processes:
            for tasks in self._tasks:
                tasks.put(None)
            deadline = time.monotonic() + (0 if self._in_flight else CLOSE_GRACE_S)
            for process in self._processes:
                process.join(max(0.1, deadline - time.monotonic()))
            self._stop(dump_stacks=False)
        self._in_flight = None
        shutil.rmtree(self._stack_dir, ignore_errors=True)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return bool(self._processes) and all(p.is_alive() for p in self._processes)

    # -- running cells ----------------------------------------------------------------
    def run(self, spec: RunSpec) -> CellOutcome:
        """Run one cell on every rank; never raises for a failing cell, only reports it."""
        self.submit(spec)
        return self.collect()

    def submit(self, spec: RunSpec) -> None:
        """Hand one cell to every rank (starting them first if need be) and return at once;
        `collect` waits for its outcome. Raises `PoolStartError` if the ranks cannot start."""
        if spec.world_size != self.world_size:
            raise ValueError(f"{spec.cell_id} wants world size {spec.world_size}, this pool has {self.world_size}")
        if not self.alive:
            self._stop(dump_stacks=False)
            self.start()
        self._counter += 1
        self._in_flight = (self._counter, spec, time.monotonic())
        for tasks in self._tasks:
            tasks.put((self._counter, spec))

    def collect(self) -> CellOutcome:
        """The outcome of the cell `submit` handed out, within its timeout counted from then;
        never raises for a failing cell, only reports it."""
        number, spec, started = self._in_flight
        replies = self._collect(number, started + spec.timeout_s - time.monotonic())
        self._in_flight = None  # not before: a pool closed while it waits (Ctrl-C) abandons the cell
        died = self._dead_without_reply(replies)
        outcome = outcome_of(spec, replies, self.world_size, time.monotonic() - started, died)
        if outcome.error is not None:
            outcome.error += self._stop(dump_stacks=len(replies) < self.world_size)
        return outcome

    def _collect(self, number: Any, timeout_s: float) -> dict[int, tuple[str, Any]]:
        """Replies for task ``number`` until every rank answered, time ran out, or a rank failed
        and the others had their grace: ERROR_GRACE_S after a rank reported an error,
        DEATH_DRAIN_S after a rank died without replying (a dead rank sends nothing more, and the
        others wait for it in their next collective). Replies to older tasks are stale and dropped."""
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.world_size and (remaining := deadline - time.monotonic()) > 0:
            try:
                got, rank, status, payload = self._results.get(timeout=min(remaining, QUEUE_POLL_S))
            except queue.Empty:
                got = None
            if got == number:
                replies[rank] = (status, payload)
                if status != "ok":
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
            if self._dead_without_reply(replies):
                deadline = min(deadline, time.monotonic() + DEATH_DRAIN_S)
        return replies

    def _dead_without_reply(self, replies: dict[int, tuple[str, Any]]) -> dict[int, str]:
        """How each rank ended whose process is gone before it answered the current task."""
        return {rank: exit_description(process.exitcode) for rank, process in enumerate(self._processes)
                if rank not in replies and not process.is_alive()}

    def _stop(self, dump_stacks: bool) -> str:
        """Stop every rank (stacks first, if asked); return the stacks as text."""
        text = ""
        if dump_stacks:
            for process in self._processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGUSR1)
            time.sleep(STACK_DUMP_WAIT_S)
            for rank in range(len(self._processes)):
                path = self._stack_dir / f"gen{self.generation}-rank{rank}.txt"
                if path.exists() and path.stat().st_size:
                    text += f"\n--- rank {rank} stacks ---\n{path.read_text()}"
        for process in self._processes:
            if process.is_alive():
                process.kill()
            process.join(5)
        for q in [*self._tasks, self._results]:
            if q is not None:
                q.cancel_join_thread()
                q.close()
        if self._lifeline is not None:
            self._lifeline.close()
        self._processes, self._tasks, self._results, self._lifeline = [], [], None, None
        return text


PER_RANK_FIELDS = ("param_checksums", "gathered_errors", "partition_updates")  # StepRecord lists that hold this rank's value only
PER_RANK_META = ("peak_rss_mib", "modules_left")  # what each rank measured of its own process (drivers.run_cell)


def merge_rank_traces(traces: list[Trace]) -> Trace:
    """Rank 0's trace, with every rank's value of each per-rank field per step, and every rank's
    figure of each per-rank measurement (``meta["peak_rss_mib_per_rank"]``...: rank 0's alone
    would hide the others')."""
    merged = traces[0]
    for name in PER_RANK_META:
        merged.meta[f"{name}_per_rank"] = [trace.meta.pop(name, None) for trace in traces]
    for index, record in enumerate(merged.steps):
        for name in PER_RANK_FIELDS:
            setattr(record, name, [value for trace in traces
                                   for value in (getattr(trace.steps[index], name) if index < len(trace.steps) else ["missing"])])
    return merged
