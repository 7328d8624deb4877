"""Helpers several test files share: a healthy hand-made trace and cell result, the pool's
probe cell, and the processes under a pid (from /proc: psutil is not a dependency)."""
import os
import time
from pathlib import Path

import numpy as np
import pytest

from numerics.cell.data import markov_chain
from numerics.cell.invariant_sets import DEFAULT_INVARIANTS
from numerics.cell.spec import RunSpec
from numerics.cell.workloads import get_workload
from numerics.judge.invariants import Verdict
from numerics.judge.thresholds import THRESHOLDS
from numerics.judge.trace import StepRecord, Trace
from numerics.run.launcher import CellOutcome
from numerics.run.runner import CellResult
from numerics.versions.releases import IndexUnreachable, published_versions

# -- hand-made traces and results (invariants, reports, the runner's failure paths) ----------
STEPS = 16
SPEC = RunSpec(zero_stage=2, dtype="fp32")


def make_trace(losses=None, grad_norms=None, reported="same", checksums=2, gathered=2, spec=SPEC, **fields) -> Trace:
    """A healthy 16-step trace (loss 4.1 -> ~3.7, grad norm ~1 decaying) unless told otherwise."""
    losses = list(np.linspace(4.1, 3.7, STEPS)) if losses is None else losses
    grad_norms = [1.0 - 0.01 * i for i in range(len(losses))] if grad_norms is None else grad_norms
    reported = grad_norms if reported == "same" else reported
    steps = [StepRecord(step=i, loss=float(loss), grad_norm=g, grad_norm_reported=r,
                        param_checksums=[f"sum{i}"] * checksums, gathered_errors=[0.0] * gathered)
             for i, (loss, g, r) in enumerate(zip(losses, grad_norms, reported))]
    floor = get_workload("markov").entropy_floor(spec, THRESHOLDS.entropy_floor_sigmas)
    defaults = dict(init_checksum="init0", step0_grads={"w": np.ones((3, 4)), "b": np.full(5, 0.5)},
                    entropy_rate=markov_chain().entropy_rate, entropy_floor=floor)
    return Trace(cell=spec.cell_id, spec=spec.to_dict(), steps=steps, **{**defaults, **fields})


GOOD_LOSSES = make_trace().values("loss")


ZERO3 = SPEC.with_(zero_stage=3)
# Per parameter, what the reference's two ZeRO-3 slices moved by in a step: "b" has one element,
# so the second slice is empty (DeepSpeed pads it).
SLICE_UPDATES = {"w": (0.3, 0.4), "b": (0.05, 0.0)}


def zero3_trace(spec=ZERO3, scale=lambda step, rank: 1.0) -> Trace:
    """A healthy ZeRO-3 trace whose rank r's slices moved by the reference's (`zero3_trace()`) times
    ``scale(step, r)``; its checksums agree, as every rank assembles the same master."""
    trace = make_trace(spec=spec)
    for record in trace.steps:
        record.partition_updates = [{name: moved[rank] * scale(record.step, rank) for name, moved in SLICE_UPDATES.items()}
                                    for rank in range(2)]
    return trace


def result(spec, *verdicts, trace=True):
    """A judged cell from hand-made verdicts (after ``completes``), with a healthy trace unless ``trace=False``."""
    outcome = CellOutcome(spec, trace=make_trace(spec=spec) if trace else None, wall_s=1.5)
    return CellResult(outcome, [Verdict("completes", "pass"), *verdicts])


# -- the rank pool ------------------------------------------------------------------------------
# fp32: traces must match bit for bit. Six steps are too few for `learns` (two windows of 4),
# whose n/a would fail the cell: a short cell says what it is not held to.
PROBE = RunSpec(zero_stage=2, steps=6, invariants=tuple(i for i in DEFAULT_INVARIANTS if i != "learns"))


# -- processes ----------------------------------------------------------------------------------
def descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (from /proc: no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie has exited, only its entry is left."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def outlive(pids: set[int], seconds: float) -> set[int]:
    """Which of ``pids`` still run after waiting up to ``seconds`` for them all to end."""
    deadline = time.monotonic() + seconds
    while (running := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    return running


def children() -> dict[int, str]:
    """This process's child processes, pid -> "name (state)", from /proc: psutil is not a dependency."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        name, _, rest = text.rpartition(")")  # the name may hold spaces and parentheses
        state, ppid = rest.split()[:2]
        if int(ppid) == os.getpid():
            found[int(stat.parent.name)] = f"{name.partition('(')[2]} ({state})"
    return found


def index_reachable() -> bool:
    """Whether pip can list releases from the package index here, as `numerics env` and `bisect` do."""
    try:
        published_versions("peft")
        return True
    except IndexUnreachable:
        return False


# Tests that need the package index skip, with the reason, where it cannot be reached; CI reaches it.
needs_index = pytest.mark.skipif(not index_reachable(), reason="the package index cannot be reached (pip index versions peft)")
