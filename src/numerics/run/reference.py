"""The reference run: plain PyTorch, one process, fp32, no DeepSpeed.

Same initial weights, data, global batch and optimizer as the cell, so a bug
that every ZeRO stage shares (loss scaling, ZeRO-0 paths) cannot hide in the
reference. Computed once per process for each distinct reference key.

A cell trains step ``s`` on the stream's global batch ``s``, unless its trace
records other samples (``meta["step_samples"]``: a Trainer's own random sampler
deals the whole dataset): then the reference trains each step on exactly those
samples, whose token mean is what a correct run computes whatever their order.

A ZeRO-3 cell's ranks each hold one slice of every parameter; its reference records, per step,
what each of the same slices of its own parameters moved by (`partition_updates`), for the
replica check to compare each rank's slice with.

A cell's ``ds_extra`` is part of its reference: the reference clips gradients and steps an lr
schedule exactly as DeepSpeed would from the same keys, and any other key that can change the
numbers still separates references, so two cells never share one they would not both compute.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Iterator, Sequence

import torch

from numerics.cell.models import build_model, tensor_checksum
from numerics.cell.spec import RunSpec
from numerics.cell.workloads import get_workload
from numerics.judge.thresholds import THRESHOLDS
from numerics.judge.trace import StepRecord, Trace
from numerics.run.continuity import as_trained
from numerics.run.lora import apply_lora
from numerics.run.train import build_optimizer, norm


@dataclass(frozen=True)
class ReferenceKey:
    """What a reference depends on: two cells with the same key share one reference."""

    model: str
    optimizer: str
    lr: float
    steps: int
    seed: int
    seq_len: int
    global_batch: int
    workload: str
    lora: bool
    step_samples: tuple[tuple[int, ...], ...] | None = None  # sample ids per step; None: the stream's own batches
    ds_extra: str = "{}"  # the cell's extra DeepSpeed keys that can change the numbers, as sorted JSON
    partitions: int = 1  # the slices `partition_updates` cuts each parameter into: ZeRO-3's, one per rank

    @classmethod
    def of(cls, spec: RunSpec, step_samples: Sequence[Sequence[int]] | None = None) -> ReferenceKey:
        return cls(spec.model, spec.optimizer, spec.lr, spec.steps, spec.seed, spec.seq_len, spec.global_batch, spec.workload, spec.lora,
                   _unless_stream_order(step_samples, spec.global_batch), _numeric_extra(spec.ds_extra),
                   spec.world_size if spec.zero_stage == 3 else 1)


# DeepSpeed keys that only log or profile: a cell's ds_extra may set them and share the reference.
INERT_DS_KEYS = ("steps_per_print", "wall_clock_breakdown", "dump_state", "flops_profiler", "comms_logger",
                 "tensorboard", "wandb", "csv_monitor")


def _numeric_extra(ds_extra: str) -> str:
    return json.dumps({k: v for k, v in json.loads(ds_extra).items() if k not in INERT_DS_KEYS}, sort_keys=True)


def _scheduler(optimizer: torch.optim.Optimizer, config: dict | None) -> object | None:
    """DeepSpeed's own lr scheduler class from a ``scheduler`` config block, on the reference's optimizer."""
    if config is None:
        return None
    from deepspeed.runtime import lr_schedules  # late: only cells with a schedule pay the import

    return getattr(lr_schedules, config["type"])(optimizer, **config.get("params", {}))


def _unless_stream_order(step_samples: Sequence[Sequence[int]] | None, size: int) -> tuple[tuple[int, ...], ...] | None:
    """Each step's sample ids as a sorted tuple, or None where every step holds the stream's own
    batch, so such cells share the stream's reference."""
    if step_samples is None:
        return None
    steps = tuple(tuple(sorted(ids)) for ids in step_samples)
    return None if all(ids == tuple(range(s * size, (s + 1) * size)) for s, ids in enumerate(steps)) else steps


def partition_updates(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], partitions: int) -> list[dict[str, float]]:
    """For each of ``partitions`` slices, the norm of every parameter's update there. ZeRO-3's
    layout: slice r of a parameter of n elements is [r * ceil(n / W), (r + 1) * ceil(n / W)) of its
    flattened tensor, the last one short (DeepSpeed pads it)."""
    slices: list[dict[str, float]] = [{} for _ in range(partitions)]
    for name, old in before.items():
        update = (after[name].double() - old.double()).reshape(-1)
        size = math.ceil(update.numel() / partitions)
        for rank, updates in enumerate(slices):
            updates[name] = norm([update[rank * size:(rank + 1) * size]])
    return slices


@contextmanager
def single_thread() -> Iterator[None]:
    """fp32 bit-reproducibility depends on the thread count; ranks use one thread too."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def reference_trace(spec: RunSpec, trace: Trace | None = None) -> Trace:
    """The reference of ``spec``, on the samples ``trace`` recorded per step where it recorded
    them, and on the batches of its applied steps only where it skipped some: its step i is
    then the cell's i-th applied step (see `applied_samples`)."""
    return _reference(ReferenceKey.of(as_trained(spec), applied_samples(spec, trace) if trace is not None else None))


def applied_samples(spec: RunSpec, trace: Trace) -> list[Sequence[int]] | None:
    """The sample ids of each step of ``trace`` that applied an update.

    After an fp16 overflow skip the cell is one update behind a reference that never skips: at
    its next step it holds the weights the reference had a step earlier. A reference trained on
    the applied steps' batches alone has, at its step i, taken exactly the updates the cell took
    before its i-th applied step, on the same batches: the two compare step for step."""
    recorded = trace.meta.get("step_samples")
    if all(not record.skipped for record in trace.steps):
        return recorded
    epoch = trace.meta.get("batches_per_epoch")  # a finite dataset: the stream's first batches, again
    size = spec.global_batch
    samples = recorded or [range((s % epoch if epoch else s) * size, ((s % epoch if epoch else s) + 1) * size)
                           for s in range(len(trace.steps))]
    return [samples[record.step] for record in trace.steps if not record.skipped]


@cache
def _reference(key: ReferenceKey) -> Trace:
    spec = RunSpec(model=key.model, optimizer=key.optimizer, lr=key.lr, steps=key.steps, seed=key.seed,
                   seq_len=key.seq_len, world_size=1, micro_batch=key.global_batch, grad_accum=1, workload=key.workload, lora=key.lora)
    workload = get_workload(spec.workload)
    started = time.perf_counter()
    with single_thread():
        model = build_model(spec.model, spec.seed)
        init_checksum = tensor_checksum(list(model.parameters()))
        if spec.lora:
            model = apply_lora(model, spec, {})
        trace = Trace(cell=f"reference-{spec.model}-{spec.optimizer}", spec=spec.to_dict(), init_checksum=init_checksum,
                      entropy_floor=workload.entropy_floor(spec, THRESHOLDS.entropy_floor_sigmas),
                      entropy_rate=workload.entropy_rate(),
                      meta={"driver": "plain torch, fp32, one process"})
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optimizer = build_optimizer(spec, iter(trainable.values()))
        extra = json.loads(key.ds_extra)
        scheduler, clip = _scheduler(optimizer, extra.get("scheduler")), extra.get("gradient_clipping", 0.0)
        for step in range(spec.steps if key.step_samples is None else len(key.step_samples)):
            batch = workload.step_batch(spec, step) if key.step_samples is None else workload.batch_of(spec, key.step_samples[step])
            optimizer.zero_grad(set_to_none=True)
            loss = workload.loss(model(**batch), batch, spec)
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in trainable.items()}  # before clipping, as DeepSpeed reports
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), clip)
            before, lr = [p.detach().clone() for p in model.parameters()], optimizer.param_groups[0]["lr"]
            pre_step = {n: p.detach().clone() for n, p in trainable.items()}
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            after = [p.detach().clone() for p in model.parameters()]
            trace.steps.append(StepRecord(
                step=step, loss=loss.item(), grad_norm=norm(list(grads.values())),
                lr=lr, update_norm=norm([a - b for a, b in zip(after, before)]), param_norm=norm(after),
                param_checksums=[tensor_checksum(after)], oracle_loss=workload.oracle_loss(batch),
                partition_updates=partition_updates(pre_step, {n: p.detach() for n, p in trainable.items()}, key.partitions),
                supervised_tokens=workload.supervised_tokens(batch),
            ))
            if step == 0:
                trace.step0_grads = {n: g.numpy() for n, g in grads.items()}
    trace.meta["wall_s"] = time.perf_counter() - started
    return trace
