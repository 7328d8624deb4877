"""Drivers "resume" and "epochs": training that must not notice its own seams.

Two incidents hid at seams of a run rather than in a step. A run resumed from a
checkpoint trained differently from the same run uninterrupted (incident 5),
and a multi-epoch run jumped in loss at an epoch boundary while its eval
quietly stopped (incident 4). Both drivers reuse the engine driver's
`train_step`, so every step is measured exactly as in an engine cell.

``resume``: one engine trains all ``spec.steps`` and saves a checkpoint after
``steps // 2``; that engine *is* the uninterrupted run, and its per-step values
go to ``meta["uninterrupted"]``. A fresh engine then loads the checkpoint and
trains the second half; the trace holds the first half of the first engine and
the resumed second half. Comparing against the engine's own uninterrupted run,
not the plain-torch reference, is what lets ``resume_matches`` demand bit
equality in fp32: same engine, same reduction order, same ranks.

``epochs``: a finite dataset of `BATCHES_PER_EPOCH` global batches, seen in the
same order every epoch (``spec.steps`` must be a whole number of epochs), a
warm-up + linear-decay schedule (DeepSpeed ``WarmupDecayLR``) unless the spec's
``ds_extra`` sets its own, and an eval on a held-out batch every `EVAL_EVERY`
steps (``meta["eval_steps"]``).

Faults act here through the `Fault` hooks ``checkpoint_load_options``,
``at_epoch_start`` and ``runs_eval``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator

import torch
import torch.distributed as dist

from numerics.cell.spec import RunSpec, SpecError
from numerics.cell.workloads import Batch, get_workload
from numerics.judge.thresholds import THRESHOLDS
from numerics.judge.trace import StepRecord, Trace
from numerics.run.train import build_engine, train_step

BATCHES_PER_EPOCH = 8  # global batches in the finite dataset: steps 0-7 of the workload's stream
EVAL_EVERY = 4  # steps between evals: twice an epoch
HELD_OUT_STEP = 10**6  # the workload step whose batch is the held-out eval set: never trained on


def _new_trace(spec: RunSpec, meta: dict[str, Any], init_checksum: str) -> Trace:
    workload = get_workload(spec.workload)
    return Trace(cell=spec.cell_id, spec=spec.to_dict(), meta=dict(meta), init_checksum=init_checksum,
                 entropy_floor=workload.entropy_floor(spec, THRESHOLDS.entropy_floor_sigmas),
                 entropy_rate=workload.entropy_rate())


def _train(engine: Any, spec: RunSpec, steps: range, rank: int, fault: Any, trace: Trace) -> list[StepRecord]:
    """Train ``steps`` on ``engine``; step 0's gradients go to the trace."""
    records = []
    with fault.installed(engine, spec, rank):
        for step in steps:
            record, grads = train_step(engine, spec, step, rank, fault)
            records.append(record)
            if step == 0:
                trace.step0_grads = {k: v.numpy() for k, v in grads.items()}
    return records


@contextmanager
def _engine(spec: RunSpec, fault: Any) -> Iterator[tuple[Any, str]]:
    """`train.build_engine`, destroyed on the way out: the ranks are persistent, the engine is not."""
    engine, init_checksum = build_engine(spec, fault)
    try:
        yield engine, init_checksum
    finally:
        engine.destroy()


@contextmanager
def _shared_tempdir(spec: RunSpec) -> Iterator[str]:
    """A directory every rank of the cell sees: rank 0 creates it and broadcasts its path, so no
    naming scheme can meet a crashed cell's leftovers. Removed once every rank is done with it;
    after an error, without waiting, so the failing rank still reports instead of hanging."""
    path = [tempfile.mkdtemp(prefix=f"numerics-{spec.cell_id}-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    try:
        yield path[0]
        dist.barrier()
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(path[0], ignore_errors=True)


def _summary(record: StepRecord) -> dict[str, Any]:
    """What `resume_matches` compares; a JSON-friendly subset of the record."""
    return {"loss": record.loss, "grad_norm": record.grad_norm, "param_checksum": record.param_checksums[0]}


def run_resume_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """Train through a save at ``steps // 2``, then resume that checkpoint in a fresh engine."""
    from numerics.cell.faults import get_fault

    fault, resume_step = get_fault(spec.fault), spec.steps // 2
    with _shared_tempdir(spec) as directory:
        with _engine(spec, fault) as (engine, init_checksum):
            trace = _new_trace(spec, meta, init_checksum)
            first = _train(engine, spec, range(resume_step), rank, fault, trace)
            engine.save_checkpoint(directory, tag="resume")
            uninterrupted = first + _train(engine, spec, range(resume_step, spec.steps), rank, fault, trace)
        with _engine(spec, fault) as (engine, _):
            engine.load_checkpoint(directory, tag="resume", **fault.checkpoint_load_options())
            resumed = _train(engine, spec, range(resume_step, spec.steps), rank, fault, trace)
    trace.steps = first + resumed
    trace.meta.update(resume_step=resume_step, uninterrupted=[_summary(r) for r in uninterrupted])
    return trace


MULTI_EPOCH_DRIVERS = ("epochs", "trainer_epochs")


def as_trained(spec: RunSpec) -> RunSpec:
    """``spec`` as its ranks train it: a multi-epoch driver adds its lr schedule (`with_schedule`),
    which the reference must step as well."""
    return with_schedule(spec) if spec.driver in MULTI_EPOCH_DRIVERS else spec


def with_schedule(spec: RunSpec) -> RunSpec:
    """``spec`` with a warm-up (half an epoch) + linear-decay schedule in its DeepSpeed config, unless
    ``ds_extra`` sets one: the schedule is config a user could copy, like the rest of the cell's."""
    extra = json.loads(spec.ds_extra)
    extra.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": spec.lr, "warmup_num_steps": BATCHES_PER_EPOCH // 2,
        "total_num_steps": spec.steps, "warmup_type": "linear"}})
    return spec.with_(ds_extra=json.dumps(extra))


def evaluate(engine: Any, spec: RunSpec, batch: Batch) -> float:
    """Mean loss of the held-out batch; every rank evaluates all of it (ZeRO-3 forwards are collective)."""
    inputs = {k: v.to(engine.device) for k, v in batch.items()}
    engine.eval()
    try:
        with torch.no_grad():
            return float(get_workload(spec.workload).loss(engine(**inputs), inputs, spec))
    finally:
        engine.train()


def run_epochs_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """Several epochs over a finite dataset, with a schedule and periodic eval."""
    from numerics.cell.faults import get_fault

    if spec.steps % BATCHES_PER_EPOCH or spec.steps < 2 * BATCHES_PER_EPOCH:
        raise SpecError(f"{spec.cell_id}: steps={spec.steps} must be two or more epochs of {BATCHES_PER_EPOCH} batches")
    fault = get_fault(spec.fault)
    with _engine(with_schedule(spec), fault) as (engine, init_checksum), fault.installed(engine, spec, rank):
        trace = _new_trace(spec, meta, init_checksum)
        eval_steps = list(range(EVAL_EVERY - 1, spec.steps, EVAL_EVERY))
        size = spec.global_batch  # the reference replays these samples: the finite dataset, epoch after epoch
        trace.meta.update(batches_per_epoch=BATCHES_PER_EPOCH, eval_steps=eval_steps,
                          step_samples=[list(range(p * size, (p + 1) * size)) for p in
                                        (step % BATCHES_PER_EPOCH for step in range(spec.steps))])
        held_out = get_workload(spec.workload).step_batch(spec, HELD_OUT_STEP)
        for step in range(spec.steps):
            epoch, position = divmod(step, BATCHES_PER_EPOCH)
            if position == 0 and epoch:
                fault.at_epoch_start(engine, epoch)
            # train_step trains on the workload's batch of the step it is given: the position in the epoch
            record, grads = train_step(engine, spec, position, rank, fault)
            record = replace(record, step=step)
            if step in eval_steps and fault.runs_eval(epoch):
                record.eval_loss = evaluate(engine, spec, held_out)
            trace.steps.append(record)
            if step == 0:
                trace.step0_grads = {k: v.numpy() for k, v in grads.items()}
    return trace
