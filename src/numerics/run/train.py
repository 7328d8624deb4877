"""The training loop each rank runs for one cell: ``deepspeed.initialize``, forward,
backward, step, and one `StepRecord` per step.

Measurements are taken around the engine, not from it, so that the engine can
be checked against them: the gradient norm is computed from the full reduced
gradients (``safe_get_full_grad``, gathered under ZeRO-3) divided by the loss
scale the optimizer will divide by, the update norm from the full parameters
after the step and after the one before it, and the replica checksum from the parameters every rank
holds after the step. Under ZeRO-3, where no rank holds the parameters whole, each
rank also records what its own slice of the fp32 master moved by in the step.

Full parameters are read only through DeepSpeed's public accessors
(``versions.compat``), never with ``GatheredParameters`` in the middle of a step:
on some releases that context raises between backward and step (0.18.0) or
returns another rank's stale buffer after the step (0.18.0-0.19.5, see
``repro/zero3_gathered_parameters.py``). What ``GatheredParameters`` shows a user
after the step is measured on purpose, once, and checked by its own invariant.
"""
from __future__ import annotations

import math
import time
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from numerics.cell.data import micro_batch_indices
from numerics.cell.models import build_model, tensor_checksum
from numerics.cell.spec import OPTIMIZER_DEFAULTS, RunSpec
from numerics.cell.workloads import get_workload, slice_batch
from numerics.judge.thresholds import THRESHOLDS
from numerics.judge.trace import StepRecord, Trace
from numerics.run import lora
from numerics.versions import compat


def build_optimizer(spec: RunSpec, params: Iterator[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The client optimizer, with the same hyper-parameters the DeepSpeed config would get."""
    options = dict(OPTIMIZER_DEFAULTS[spec.optimizer])
    if spec.optimizer == "adamw":
        options["betas"] = tuple(options["betas"])
        return torch.optim.AdamW(params, lr=spec.lr, **options)
    return torch.optim.SGD(params, lr=spec.lr, **options)


def loss_scale(engine: Any) -> float | None:
    """The loss scale the engine's optimizer divides gradients by; None outside fp16."""
    if not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    for owner, name in ((optimizer, "cur_scale"), (getattr(optimizer, "loss_scaler", None), "cur_scale"), (optimizer, "loss_scale")):
        value = getattr(owner, name, None)
        if value is not None:
            return float(value)
    return None


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def full_grads(engine: Any) -> dict[str, torch.Tensor]:
    """Full, reduced gradients of trainable parameters as fp32 CPU tensors (still loss-scaled).

    Collective under ZeRO 1-3: every rank must call it, in the same order.
    """
    from deepspeed.utils import safe_get_full_grad

    named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        grads = compat.full_grads([p for _, p in named])
    else:
        with compat.coalesced_reductions([p for _, p in named]):
            grads = [safe_get_full_grad(p) for _, p in named]
    return {name: torch.zeros(param.ds_shape if hasattr(param, "ds_shape") else param.shape) if grad is None
            else grad.detach().float().cpu().clone() for (name, param), grad in zip(named, grads)}


def full_params(engine: Any) -> list[torch.Tensor]:
    """The parameters the optimizer updates, in full, fp32 on CPU: the module's own tensors at
    ZeRO 0-2, where every rank holds them whole; at ZeRO-3 the optimizer's fp32 master,
    assembled from the ranks' partitions (collective: every rank calls it in the same order)."""
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        return [t.float().cpu().clone() for t in compat.full_fp32_params(trainable)]
    return [p.detach().float().cpu().clone() for p in trainable]


def own_partitions(engine: Any) -> dict[str, torch.Tensor] | None:
    """ZeRO-3: what this rank alone holds of each trainable parameter, its slice of the fp32 master
    (not collective; see ``compat.own_fp32_partitions``). None below ZeRO-3, where every rank holds
    every parameter whole and the replica checksum compares what it holds."""
    if engine.zero_optimization_stage() != 3:
        return None
    named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    return dict(zip([name for name, _ in named], compat.own_fp32_partitions([p for _, p in named])))


def gathered_view_error(engine: Any, masters: list[torch.Tensor]) -> float | None:
    """ZeRO-3: the largest difference, on this rank, between what ``GatheredParameters`` shows
    (what a forward pass, a user's logging or a 16-bit save sees) and the fp32 master cast to
    the module's dtype, which it must equal bit for bit; None below ZeRO-3. Collective."""
    if engine.zero_optimization_stage() != 3:
        return None
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    views = compat.gathered_params(trainable)
    return max(float((view.float() - master.to(param.dtype).float()).abs().max())
               for view, master, param in zip(views, masters, trainable))


def global_mean(value: torch.Tensor, device: torch.device) -> float:
    tensor = value.detach().float().reshape(1).to(device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def train_step(engine: Any, spec: RunSpec, step: int, rank: int, fault: Any) -> tuple[StepRecord, dict[str, torch.Tensor]]:
    workload = get_workload(spec.workload)
    batch = workload.step_batch(spec, step)
    losses = []
    for micro in range(spec.grad_accum):
        indices = micro_batch_indices(spec.global_batch, spec.micro_batch, spec.grad_accum, spec.world_size, rank, micro)
        inputs = {k: v.to(engine.device) for k, v in slice_batch(batch, indices).items()}
        loss = workload.loss(engine(**inputs), inputs, spec)
        fault.backward(engine, loss)
        losses.append(loss.detach().float())
        if micro < spec.grad_accum - 1:
            engine.step()  # DeepSpeed counts micro-steps in step(); it only applies the update at the boundary
    return measure_step(engine, spec, step, batch, losses, engine.step)


# What each live engine's parameters were after its last measured step: the next step's "before".
# Reading them once per step instead of twice saves, at ZeRO-3, a gather of every parameter (~4 %
# of a cell). Whatever moves the weights between two steps (a forward or a gather that writes them)
# then counts in the next step's update, which is what a user's weights did. A new engine (a resume)
# starts with its own read.
_HELD_AFTER_LAST_STEP: weakref.WeakKeyDictionary[Any, tuple[list[torch.Tensor], dict[str, torch.Tensor] | None]] = \
    weakref.WeakKeyDictionary()


def measure_step(engine: Any, spec: RunSpec, step: int, batch: dict[str, torch.Tensor], micro_losses: list[torch.Tensor],
                 do_step: Callable[[], Any]) -> tuple[StepRecord, dict[str, torch.Tensor]]:
    """Run ``do_step`` (the optimizer step at the accumulation boundary) with the measurements
    around it. Shared by every driver; collective under ZeRO: all ranks call it at the same point."""
    workload = get_workload(spec.workload)
    scale = loss_scale(engine)
    grads = {k: g / (scale or 1.0) for k, g in full_grads(engine).items()}
    before, own_before = _HELD_AFTER_LAST_STEP.pop(engine, None) or (full_params(engine), own_partitions(engine))
    skipped_before = engine.skipped_steps
    do_step()
    after, own_after = full_params(engine), own_partitions(engine)
    _HELD_AFTER_LAST_STEP[engine] = after, own_after
    gathered_error = gathered_view_error(engine, after)
    record = StepRecord(
        step=step,
        loss=global_mean(torch.stack(micro_losses).mean(), engine.device),
        grad_norm=norm(list(grads.values())),
        grad_norm_reported=_to_float(engine.get_global_grad_norm()),
        loss_scale=scale,
        skipped=(engine.skipped_steps > skipped_before) if scale is not None else None,
        lr=float(engine.get_lr()[0]),
        update_norm=norm([a - b for a, b in zip(after, before)]),
        param_norm=norm(after),
        param_checksums=[tensor_checksum(after)],
        partition_updates=[] if own_before is None else [
            {name: norm([own_after[name].double() - part.double()]) for name, part in own_before.items()}],
        gathered_errors=[] if gathered_error is None else [gathered_error],
        oracle_loss=workload.oracle_loss(batch),
        supervised_tokens=workload.supervised_tokens(batch),
    )
    return record, grads


def build_engine(spec: RunSpec, fault: Any) -> tuple[Any, str]:
    """A fresh model (LoRA-wrapped if asked), its optimizer and ``deepspeed.initialize``;
    returns the engine and the checksum of the initial weights, taken before any cast."""
    import deepspeed

    model = build_model(spec.model, spec.seed)
    init_checksum = tensor_checksum(list(model.parameters()))
    model = fault.prepare_model(model, spec)
    if spec.lora:
        model = lora.apply_lora(model, spec, fault.adapter_options())
    trainable = [p for p in model.parameters() if p.requires_grad]
    client = build_optimizer(spec, iter(trainable)) if spec.optimizer_source == "client" else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, model_parameters=None if client else trainable,
                                      config=spec.ds_config())
    return engine, init_checksum


def run_engine_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """Train one cell on this rank and return its trace (this rank's checksums only)."""
    from numerics.cell.faults import get_fault

    fault = get_fault(spec.fault)
    started = time.perf_counter()
    engine, init_checksum = build_engine(spec, fault)
    built = time.perf_counter()
    workload = get_workload(spec.workload)
    trace = Trace(cell=spec.cell_id, spec=spec.to_dict(), meta=dict(meta), init_checksum=init_checksum,
                  entropy_floor=workload.entropy_floor(spec, THRESHOLDS.entropy_floor_sigmas),
                  entropy_rate=workload.entropy_rate())
    try:
        if spec.lora:
            lora.record_start(engine, trace.meta)
        with fault.installed(engine, spec, rank):
            for step in range(spec.steps):
                record, grads = train_step(engine, spec, step, rank, fault)
                trace.steps.append(record)
                if step == 0:
                    trace.step0_grads = {k: v.numpy() for k, v in grads.items()}
        # Where a cell's time goes (benchmarks/throughput.py): building the engine vs its steps.
        trace.meta.update(build_s=built - started, steps_s=time.perf_counter() - built)
        if spec.lora:
            lora.record_end(engine, spec, trace.meta, workload.step_batch(spec, spec.steps)["input_ids"])
    finally:
        engine.destroy()
    return trace
