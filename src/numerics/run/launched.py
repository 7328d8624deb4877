"""Cells on ranks an external launcher started: torchrun or the DeepSpeed launcher, over nodes.

`RankPool` spawns its ranks on one machine. A cell wider than one machine (world size 16
on two 8-GPU nodes) needs the cluster's launcher to start them; every process it starts
runs ``numerics launched`` with the same selection. Each rank computes the same cell list
(every cell of that world size), runs the cells in order exactly as a pool rank does
(`numerics.run.drivers.run_cell`), and sends its trace, or its traceback, to rank 0 over the
process group the launcher made. Rank 0 judges them as `numerics run` does and writes the
report (with the writer the CLI passes in: the run layer draws no report itself). A node
that never joins ends the run at the launcher's join timeout; a node or rank lost mid-cell
ends it at the cell's timeout (a watchdog on every rank) with the report written, rather
than a hang.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from numerics.cell.spec import RunSpec

# Prints and writes the report of the cells judged so far into a directory (`numerics.show`).
Writer = Callable[[list[Any], Path], None]


def launched_rank() -> tuple[int, int]:
    """(rank, world size) the launcher set; a clear error outside a launcher."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError:
        raise SystemExit("numerics launched runs under torchrun or the DeepSpeed launcher, which set RANK and "
                         "WORLD_SIZE; on one machine use numerics run") from None


def cells_for(world_size: int, cover: str, pattern: str | None) -> list[RunSpec]:
    from numerics.cell import matrix

    return [spec for spec in matrix.named_cells(cover, pattern) if spec.world_size == world_size]


def serve(specs: list[RunSpec], rank: int, world_size: int, meta: dict[str, Any], timeout_s: float | None,
          report: Path, write: Writer) -> list[Any]:
    """Run every cell on this rank; on rank 0 return their results, judged."""
    import torch.distributed as dist

    from numerics.run.launcher import outcome_of, reply_for
    from numerics.run.runner import evaluate

    results: list[Any] = []
    for number, spec in enumerate(specs, 1):
        started = time.monotonic()
        if rank == 0:
            print(f"[{number}/{len(specs)}] running {spec.cell_id}", flush=True)
        with Watchdog(spec, timeout_s or spec.timeout_s, rank, results, report, write):
            reply = reply_for(spec, rank, meta)
            replies: list[Any] = [None] * world_size if rank == 0 else []
            try:
                dist.gather_object(reply, replies if rank == 0 else None, dst=0)
            except RuntimeError as lost:  # gloo ends a collective at once when a peer's connection closes
                if rank != 0:
                    raise
                results.append(evaluate(outcome_of(spec, {0: reply}, world_size, time.monotonic() - started)))
                print(f"{spec.cell_id}: the launcher's ranks sent no result: {str(lost).splitlines()[0]}",
                      file=sys.stderr, flush=True)
                return results  # the process group is broken: no later cell can run
        if rank == 0:
            result = evaluate(outcome_of(spec, dict(enumerate(replies)), world_size, time.monotonic() - started))
            results.append(result)
            print(f"[{number}/{len(specs)}] {result.status:5s} {spec.cell_id} ({result.outcome.wall_s:.1f}s)", flush=True)
    return results


class Watchdog:
    """Ends the run when a cell overruns its timeout. A node or rank lost mid-cell can leave the
    others waiting in a collective that never returns (seen on CPU: the process group's timeout
    did not end it), and there is no parent to stop them as in our pool:
    rank 0 writes the report, the overrunning cell failed with every thread's stack, and every
    rank exits. Armed for one cell at a time."""

    def __init__(self, spec: RunSpec, timeout_s: float, rank: int, results: list[Any], report: Path,
                 write: Writer) -> None:
        self.spec, self.rank, self.results, self.report, self.write = spec, rank, results, report, write
        # Rank 0 fires first, so it writes the report before the others leave.
        self.timer = threading.Timer(timeout_s + (0 if rank == 0 else 30), self.fire, args=(timeout_s,))
        self.timer.daemon = True

    def __enter__(self) -> Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()

    def fire(self, timeout_s: float) -> None:
        if self.rank == 0:
            from numerics.run.launcher import CellOutcome
            from numerics.run.runner import evaluate

            with tempfile.TemporaryFile("w+") as stacks:
                faulthandler.dump_traceback(stacks, all_threads=True)
                stacks.seek(0)
                error = (f"the launcher's ranks sent no result within {timeout_s:.0f}s: a node or rank lost, or "
                         f"hung (rank 0's stacks below)\n{stacks.read()}")
            self.results.append(evaluate(CellOutcome(self.spec, error=error, timed_out=True, wall_s=timeout_s)))
            print(f"{self.spec.cell_id}: {error.splitlines()[0]}", file=sys.stderr, flush=True)
            self.write(self.results, self.report)
        os._exit(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options besides ``--cover``/``--full``, which the CLI adds as for every selection."""
    parser.add_argument("--cells", metavar="GLOB", help="only cells whose id matches (of the launcher's world size)")
    parser.add_argument("--report", default="reports/launched", help="rank 0 writes results.json, junit.xml, report.html")
    parser.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl with a GPU per local rank, else gloo")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="how long one cell may take (default: the cell's own timeout); a node or rank lost "
                             "mid-cell ends the run then, with the report of what finished and that cell failed")


def main(args: argparse.Namespace, write: Writer) -> int:
    """``numerics launched``, on every rank: exit 2 when no cell matches, 1 on rank 0 when a cell failed.
    Rank 0 hands the judged cells to ``write`` (`numerics.show.cli` passes the report writer)."""
    rank, world_size = launched_rank()
    specs = cells_for(world_size, args.cover, args.cells)
    if not specs:
        print(f"no cells of world size {world_size} match {args.cells!r}", file=sys.stderr)
        return 2
    from numerics.run.launcher import start_rank
    from numerics.run.platform import choose_backend

    backend = args.backend or choose_backend(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    timeout = datetime.timedelta(seconds=args.timeout_s or max(spec.timeout_s for spec in specs))
    meta = start_rank(world_size, int(os.environ.get("LOCAL_RANK", rank)), backend, timeout)
    results = serve(specs, rank, world_size, meta, args.timeout_s, Path(args.report), write)
    if rank != 0:
        return 0
    write(results, Path(args.report))
    return 1 if any(r.status == "fail" for r in results) else 0
