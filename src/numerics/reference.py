"""The reference run: plain PyTorch, one process, fp32, no DeepSpeed.

Same initial weights, data, global batch and optimizer as the cell, so a bug
that every ZeRO stage shares (loss scaling, ZeRO-0 paths) cannot hide in the
reference. Computed once per process for each distinct reference key.

A cell trains step ``s`` on the stream's global batch ``s``, unless its trace
records other samples (``meta["step_samples"]``: a Trainer's own random sampler
deals the whole dataset): then the reference trains each step on exactly those
samples, whose token mean is what a correct run computes whatever their order.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Iterator, Sequence

import torch

from numerics.lora import apply_lora
from numerics.models import build_model, tensor_checksum
from numerics.spec import RunSpec
from numerics.trace import StepRecord, Trace
from numerics.train import build_optimizer, norm
from numerics.workloads import get_workload


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

    @classmethod
    def of(cls, spec: RunSpec, step_samples: Sequence[Sequence[int]] | None = None) -> ReferenceKey:
        return cls(spec.model, spec.optimizer, spec.lr, spec.steps, spec.seed, spec.seq_len, spec.global_batch, spec.workload, spec.lora,
                   _unless_stream_order(step_samples, spec.global_batch))


def _unless_stream_order(step_samples: Sequence[Sequence[int]] | None, size: int) -> tuple[tuple[int, ...], ...] | None:
    """Each step's sample ids as a sorted tuple, or None where every step holds the stream's own
    batch, so such cells share the stream's reference."""
    if step_samples is None:
        return None
    steps = tuple(tuple(sorted(ids)) for ids in step_samples)
    return None if all(ids == tuple(range(s * size, (s + 1) * size)) for s, ids in enumerate(steps)) else steps


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
    """The reference of ``spec``, on the samples ``trace`` recorded per step where it recorded them."""
    return _reference(ReferenceKey.of(spec, trace.meta.get("step_samples") if trace is not None else None))


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
                      entropy_floor=workload.entropy_floor(spec), entropy_rate=workload.entropy_rate(),
                      meta={"driver": "plain torch, fp32, one process"})
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optimizer = build_optimizer(spec, iter(trainable.values()))
        for step in range(spec.steps if key.step_samples is None else len(key.step_samples)):
            batch = workload.step_batch(spec, step) if key.step_samples is None else workload.batch_of(spec, key.step_samples[step])
            optimizer.zero_grad(set_to_none=True)
            loss = workload.loss(model(**batch), batch, spec)
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in trainable.items()}
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            after = [p.detach().clone() for p in model.parameters()]
            trace.steps.append(StepRecord(
                step=step, loss=loss.item(), grad_norm=norm(list(grads.values())),
                lr=spec.lr, update_norm=norm([a - b for a, b in zip(after, before)]), param_norm=norm(after),
                param_checksums=[tensor_checksum(after)], oracle_loss=workload.oracle_loss(batch),
                supervised_tokens=workload.supervised_tokens(batch),
            ))
            if step == 0:
                trace.step0_grads = {n: g.numpy() for n, g in grads.items()}
    trace.meta["wall_s"] = time.perf_counter() - started
    return trace
