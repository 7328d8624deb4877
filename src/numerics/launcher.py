"""`RankPool`: a persistent group of ranks that runs cell after cell.

Importing DeepSpeed and starting a process group cost ~10 s per spawn, far more
than a tiny cell trains, so the ranks stay up and take cells from a queue. A
cell that raises returns every rank's traceback; a cell that hangs is stopped
at its timeout with every rank's Python stacks (faulthandler). Either way the
pool is torn down and rebuilt on a fresh port, and the next cell runs clean.
Verdicts come from what ranks sent, never from exit codes: ZeRO-3 teardown can
abort a process after its results are complete.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import queue
import signal
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from numerics.spec import RunSpec
from numerics.trace import Trace

ERROR_GRACE_S = 10.0  # after one rank fails, how long the others get to report before they are stopped
START_TIMEOUT_S = 300.0  # importing DeepSpeed and building its CPU comm op on a cold machine
STACK_DUMP_WAIT_S = 1.0
PARENT_POLL_S = 5.0  # how often a rank checks that its parent is still there


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, device_offset: int,
               tasks: Any, results: Any, stack_file: str) -> None:
    """Body of one rank: start the process group once, then run cells until told to stop."""
    from numerics.platform import rank_environment

    exit_with_parent(os.getppid())
    os.environ.update(rank_environment(rank, world_size, port, backend))
    stacks = open(stack_file, "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        import torch

        torch.set_num_threads(1)  # 2 cores, and bit-reproducibility depends on the thread count
        import deepspeed

        from numerics.platform import lift_cpu_fp16_check, quiet_libraries, run_metadata

        quiet_libraries()

        lifted = lift_cpu_fp16_check()
        if backend == "nccl":
            torch.cuda.set_device(device_offset + rank)
        deepspeed.init_distributed(dist_backend=backend)
        meta = run_metadata(backend, world_size, lifted)
    except BaseException:
        results.put(("start", rank, "error", traceback.format_exc()))
        return
    results.put(("start", rank, "ok", None))
    from numerics.cells import run_cell

    from numerics.versions.compat import Unsupported

    while (task := tasks.get()) is not None:
        number, spec = task
        try:
            results.put((number, rank, "ok", run_cell(spec, rank, meta)))
        except Unsupported as err:
            results.put((number, rank, "unsupported", str(err)))
        except BaseException:
            results.put((number, rank, "error", traceback.format_exc()))


def exit_with_parent(parent: int) -> None:
    """Exit this rank once its parent is gone. A parent killed with SIGKILL cannot tell its
    ranks to stop, and a rank may be anywhere then: idle, hung in a collective, waiting on
    a JIT build's lock. A daemon thread notices wherever the main thread is."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class RankPool:
    """``world_size`` ranks on one backend, started lazily and rebuilt after a failure."""

    def __init__(self, world_size: int, backend: str | None = None, device_offset: int = 0) -> None:
        from numerics.platform import choose_backend

        self.world_size = world_size
        self.backend = backend or choose_backend(world_size)
        self.device_offset = device_offset  # first GPU of this pool: pytest-xdist workers get disjoint GPUs
        self._context = mp.get_context("spawn")
        self._processes: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._stack_dir = Path(tempfile.mkdtemp(prefix="numerics-stacks-"))
        self._counter = 0
        self.generation = 0  # how many times the ranks were (re)started

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.backend == "gloo":
            from numerics.prepare import ensure_cpu_ops

            ensure_cpu_ops()
        port = free_port()
        self.generation += 1
        self._results = self._context.Queue()
        self._tasks = [self._context.Queue() for _ in range(self.world_size)]
        self._processes = []
        for rank in range(self.world_size):
            stack_file = str(self._stack_dir / f"gen{self.generation}-rank{rank}.txt")
            process = self._context.Process(
                target=_rank_main,
                args=(rank, self.world_size, port, self.backend, self.device_offset,
                      self._tasks[rank], self._results, stack_file),
                daemon=True,
                name=f"numerics-rank{rank}",
            )
            process.start()
            self._processes.append(process)
        replies = self._collect("start", START_TIMEOUT_S)
        failed = {rank: text for rank, (status, text) in replies.items() if status != "ok"}
        if failed or len(replies) < self.world_size:
            stacks = self._stop(dump_stacks=len(replies) < self.world_size)
            raise RuntimeError(f"rank pool (ws={self.world_size}, {self.backend}) failed to start:\n"
                               + "\n".join(f"rank {r}:\n{t}" for r, t in failed.items()) + stacks)

    def close(self) -> None:
        if not self._processes:
            return
        for tasks in self._tasks:
            tasks.put(None)
        deadline = time.monotonic() + 10
        for process in self._processes:
            process.join(max(0.1, deadline - time.monotonic()))
        self._stop(dump_stacks=False)

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
        if spec.world_size != self.world_size:
            raise ValueError(f"{spec.cell_id} wants world size {spec.world_size}, this pool has {self.world_size}")
        if not self.alive:
            self._stop(dump_stacks=False)
            self.start()
        self._counter += 1
        started = time.monotonic()
        for tasks in self._tasks:
            tasks.put((self._counter, spec))
        replies = self._collect(self._counter, spec.timeout_s, error_grace_s=ERROR_GRACE_S)
        outcome = CellOutcome(spec=spec, wall_s=time.monotonic() - started)
        unsupported = {text for status, text in replies.values() if status == "unsupported"}
        if unsupported and len(replies) == self.world_size and all(s == "unsupported" for s, _ in replies.values()):
            outcome.cannot = ("cannot run", "; ".join(sorted(unsupported)))  # every rank stopped at the same missing API
            return outcome
        outcome.rank_errors = {rank: text for rank, (status, text) in replies.items() if status != "ok"}
        missing = sorted(set(range(self.world_size)) - set(replies))
        if missing or outcome.rank_errors:
            stacks = self._stop(dump_stacks=bool(missing))
            outcome.timed_out = bool(missing) and not outcome.rank_errors
            parts = [f"rank {r} raised:\n{t}" for r, t in sorted(outcome.rank_errors.items())]
            if missing:
                parts.append(f"ranks {missing} sent no result within "
                             f"{spec.timeout_s if outcome.timed_out else ERROR_GRACE_S:.0f}s{stacks}")
            outcome.error = "\n".join(parts)
            return outcome
        outcome.trace = merge_rank_traces([replies[r][1] for r in range(self.world_size)])
        return outcome

    def _collect(self, number: Any, timeout_s: float, error_grace_s: float | None = None) -> dict[int, tuple[str, Any]]:
        """Replies for task ``number`` until every rank answered, time ran out, or (after an
        error) the grace period ended. Replies to older tasks are stale and dropped."""
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                got, rank, status, payload = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in self._processes):
                    break
                continue
            if got != number:
                continue
            replies[rank] = (status, payload)
            if status != "ok" and error_grace_s is not None:
                deadline = min(deadline, time.monotonic() + error_grace_s)
        return replies

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
        self._processes, self._tasks, self._results = [], [], None
        return text


PER_RANK_FIELDS = ("param_checksums", "gathered_errors")  # StepRecord lists that hold this rank's value only


def merge_rank_traces(traces: list[Trace]) -> Trace:
    """Rank 0's trace, with every rank's value of each per-rank field per step."""
    merged = traces[0]
    for index, record in enumerate(merged.steps):
        for name in PER_RANK_FIELDS:
            setattr(record, name, [value for trace in traces
                                   for value in (getattr(trace.steps[index], name) if index < len(trace.steps) else ["missing"])])
    return merged
