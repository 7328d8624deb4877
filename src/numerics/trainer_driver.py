"""Drivers "trainer" and "trainer_epochs": the engine and epochs drivers' cells, trained through
``transformers.Trainer``.

Fine-tuning users rarely call ``deepspeed.initialize`` themselves; they hand a
DeepSpeed config to ``TrainingArguments`` and let the Trainer and accelerate
build the engine, scale the loss, step, evaluate and log. This driver runs that
path on the same model, data, global batches and loss (the cell's workload) as
the engine driver, and measures around the engine the same way, so both drivers
answer to the same invariants.

Two Trainer defaults are defeated on purpose: the train dataloader is this
rank's micro-batches in order (no shuffling, no accelerate sharding), and the
measurements wrap ``engine.step`` itself, because accelerate's DeepSpeed
wrapper steps the engine inside ``accelerator.backward``: the Trainer's
``on_pre_optimizer_step`` callback fires after the update, too late.

``trainer_epochs`` is continuity.py's epochs cell under the Trainer: one
epoch's batches as a finite dataset, ``num_train_epochs`` over it, the same
warm-up/decay DeepSpeed scheduler, and the Trainer's own step-scheduled eval
on the held-out batch, its ``eval_loss`` read back from the Trainer's logs.
That eval is where incident 4 hid: it silently stopped appearing.

Faults: workload faults act inside the workload and need no seam; the epoch
faults act through callbacks at the Trainer's epoch start and eval decision.
Faults at the engine's backward or reduction have no seam here and are refused.
"""
from __future__ import annotations

import os
import tempfile
from functools import partial
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from numerics.cells import torch_linear
from numerics.continuity import BATCHES_PER_EPOCH, EVAL_EVERY, HELD_OUT_STEP, with_schedule
from numerics.data import micro_batch_indices
from numerics.faults import EpochFault, Fault, WorkloadFault, get_fault
from numerics.models import build_model, tensor_checksum
from numerics.spec import OPTIMIZER_DEFAULTS, RunSpec, SpecError
from numerics.trace import Trace
from numerics.train import measure_step
from numerics.workloads import Batch, get_workload, slice_batch

Sample = dict[str, torch.Tensor]


def training_arguments(spec: RunSpec, output_dir: str, **overrides: Any) -> TrainingArguments:
    """Arguments that agree with ``spec.ds_config()`` key for key, so the Trainer fills no
    "auto" and finds no mismatch (its scheduler's warm-up included). A client optimizer is the
    Trainer's own (``optim``): under DeepSpeed, ``deepspeed_init`` drops one passed as
    ``optimizers=(opt, None)``."""
    config, defaults = spec.ds_config(), OPTIMIZER_DEFAULTS[spec.optimizer]
    betas = defaults.get("betas", (0.9, 0.999))
    schedule = config.get("scheduler", {}).get("params")  # a DeepSpeed WarmupDecayLR is HF's "linear"
    arguments = dict(
        output_dir=output_dir, deepspeed=config, use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=spec.micro_batch, gradient_accumulation_steps=spec.grad_accum,
        max_steps=spec.steps, learning_rate=spec.lr, lr_scheduler_type="linear" if schedule else "constant",
        warmup_steps=schedule["warmup_num_steps"] if schedule else 0,
        optim="adamw_torch" if spec.optimizer == "adamw" else "sgd",
        optim_args=None if spec.optimizer == "adamw" else f"momentum={defaults['momentum']}",
        weight_decay=defaults.get("weight_decay", 0.0), adam_beta1=betas[0], adam_beta2=betas[1],
        adam_epsilon=defaults.get("eps", 1e-8), max_grad_norm=config["gradient_clipping"],
        bf16=spec.dtype == "bf16", fp16=spec.dtype == "fp16", seed=spec.seed,
        logging_steps=1, logging_nan_inf_filter=False, report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    return TrainingArguments(**{**arguments, **overrides})


def rows(batch: Batch) -> list[Sample]:
    """A batch as the per-sample dicts a Trainer dataset holds."""
    return [{key: value[row] for key, value in batch.items()} for row in range(len(batch["input_ids"]))]


def rank_samples(spec: RunSpec, rank: int, batches: list[Batch]) -> list[Sample]:
    """This rank's samples in training order: its micro-batches, step-major, as the engine driver feeds them."""
    return [sample for batch in batches for micro in range(spec.grad_accum)
            for sample in rows(slice_batch(batch, micro_batch_indices(spec.global_batch, spec.micro_batch, spec.grad_accum,
                                                                      spec.world_size, rank, micro)))]


class NumericsTrainer(Trainer):
    """A Trainer that feeds the cell's micro-batches in order and backpropagates the workload's loss.

    The engine driver hands ``workload.loss`` of each micro-batch to ``engine.backward``, which
    divides it by GA. Under the Trainer, accelerate calls ``engine.backward(loss, scale_wrt_gas=False)``
    and the Trainer divides by GA itself unless told the loss is already scaled for it: it is not
    (``loss_is_scaled_for_ga``), so the gradient is the engine driver's. The Trainer's own token
    counting (``num_items_in_batch``) is off: the workload normalises its loss, ``padded`` by the
    step's global target count."""

    loss_is_scaled_for_ga = False

    def __init__(self, spec: RunSpec, samples: list[Sample], **kwargs: Any) -> None:
        super().__init__(train_dataset=samples, **kwargs)
        self.spec, self.workload = spec, get_workload(spec.workload)
        self.model_accepts_loss_kwargs = False
        self.micro_losses: list[torch.Tensor] = []

    def get_train_dataloader(self) -> DataLoader:
        """Sequential and unsharded: the dataset is already this rank's share, in order, and
        accelerate's prepare would deal its batches round-robin across ranks again."""
        return DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size, sampler=SequentialSampler(self.train_dataset),
                          collate_fn=self.data_collator, num_workers=0)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The workload's loss of the micro-batch (eval batches included), kept for the step's record when training."""
        outputs = model(**inputs)
        loss = self.workload.loss(outputs, inputs, self.spec)
        if model.training:
            self.micro_losses.append(loss.detach().float())
        return (loss, outputs) if return_outputs else loss


class StepProbe(TrainerCallback):
    """Measures each optimizer step around ``engine.step`` and collects what the Trainer logged.

    ``batches`` is the dataset, one epoch: step ``s`` trains on ``batches[s % len(batches)]``."""

    def __init__(self, trainer: NumericsTrainer, spec: RunSpec, batches: list[Batch], trace: Trace) -> None:
        self.trainer, self.spec, self.batches, self.trace = trainer, spec, batches, trace

    def position(self, step: int) -> int:
        return step % len(self.batches)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        engine = self.trainer.deepspeed
        engine.step = partial(self._measured_step, engine, engine.step)  # this instance only; destroyed after the cell

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the step's batch as the engine loop does before its micro-batches: ``padded``
        normalises each micro-batch's loss by the target count of the step it built last."""
        self.trainer.workload.step_batch(self.spec, self.position(state.global_step))

    def _measured_step(self, engine: Any, step_fn: Callable[[], Any]) -> None:
        step = len(self.trace.steps)
        record, grads = measure_step(engine, self.spec, step, self.batches[self.position(step)], self.trainer.micro_losses, step_fn)
        self.trainer.micro_losses.clear()
        self.trace.steps.append(record)
        if step == 0:
            self.trace.step0_grads = {k: v.numpy() for k, v in grads.items()}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        record = self.trace.steps[state.global_step - 1] if logs else None
        if record is not None and "loss" in logs:
            record.grad_norm_reported = logs.get("grad_norm")
            record.extra.update(logged_loss=logs["loss"], logged_lr=logs.get("learning_rate"))
        if record is not None and "eval_loss" in logs:
            record.eval_loss = logs["eval_loss"]


class EpochSeams(TrainerCallback):
    """The epochs driver's fault seams at the Trainer's own epoch start and eval decision."""

    def __init__(self, trainer: NumericsTrainer, fault: Fault) -> None:
        self.trainer, self.fault = trainer, fault

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = state.global_step // BATCHES_PER_EPOCH
        if epoch:
            self.fault.at_epoch_start(self.trainer.deepspeed, epoch)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Runs after DefaultFlowCallback scheduled the eval: a fault can cancel it, as a loop whose
        eval silently stops does."""
        if control.should_evaluate and not self.fault.runs_eval((state.global_step - 1) // BATCHES_PER_EPOCH):
            control.should_evaluate = False


def inherited_state() -> list[str]:
    """Trainer state a cell finds left over in its rank; recorded so a leak shows in the trace."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from transformers.integrations.deepspeed import deepspeed_config

    found = ["transformers DeepSpeed config"] if deepspeed_config() is not None else []
    found += ["ZeRO-3 torch.nn.functional.linear"] if torch.nn.functional.linear is not torch_linear() else []
    found += [cls.__name__ for cls in (PartialState, AcceleratorState, GradientState) if cls._shared_state]
    return found + sorted(key for key in os.environ if key.startswith("ACCELERATE_"))


def release(trainer: Trainer | None, environ: dict[str, str]) -> None:
    """Undo what a Trainer leaves in a persistent rank (cells.py restores what every driver
    leaves): its engine; the global DeepSpeed config, which makes a later ``from_config``
    build under ``zero.Init``; accelerate's singletons (resetting them keeps the process group,
    accelerate adopts it again); and the environment, where accelerate leaves
    ``ACCELERATE_USE_DEEPSPEED=true`` for every later TrainingArguments."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if trainer is not None and trainer.deepspeed is not None:
        trainer.deepspeed.destroy()
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update(environ)


def supported_fault(spec: RunSpec, kinds: tuple[type[Fault], ...]) -> Fault:
    """The cell's fault, if it acts at a seam this driver has (``kinds``); refused otherwise."""
    fault = get_fault(spec.fault)
    if spec.fault is not None and not isinstance(fault, kinds):
        raise ValueError(f"{spec.cell_id}: fault {spec.fault} acts on the engine driver's loop; the {spec.driver} driver has no seam for it")
    return fault


def train(spec: RunSpec, rank: int, meta: dict[str, Any], batches: list[Batch], arguments_spec: RunSpec,
          eval_batch: Batch | None = None, callbacks: Callable[[NumericsTrainer], list[TrainerCallback]] = lambda trainer: [],
          **arguments: Any) -> Trace:
    """Train ``spec`` through a Trainer over ``batches`` (one epoch), with ``arguments_spec``'s
    DeepSpeed config and ``arguments``; the Trainer's eval, if scheduled, is on ``eval_batch``
    (accelerate deals it across the ranks). This rank's checksums only."""
    model, workload = build_model(spec.model, spec.seed), get_workload(spec.workload)
    trace = Trace(cell=spec.cell_id, spec=spec.to_dict(), meta={**meta, "driver": spec.driver, "inherited_state": inherited_state()},
                  init_checksum=tensor_checksum(list(model.parameters())),
                  entropy_floor=workload.entropy_floor(spec), entropy_rate=workload.entropy_rate())
    trainer, environ = None, dict(os.environ)
    try:
        with tempfile.TemporaryDirectory(prefix="numerics-trainer-") as output_dir:
            trainer = NumericsTrainer(spec, rank_samples(spec, rank, batches), model=model,
                                      eval_dataset=None if eval_batch is None else rows(eval_batch),
                                      args=training_arguments(arguments_spec, output_dir, **arguments))
            trainer.remove_callback(PrinterCallback)
            for callback in [StepProbe(trainer, spec, batches, trace), *callbacks(trainer)]:
                trainer.add_callback(callback)
            trainer.train()
    finally:
        release(trainer, environ)
    return trace


def run_trainer_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """Train one cell on this rank through ``transformers.Trainer``, a fresh batch every step."""
    supported_fault(spec, (WorkloadFault,))
    workload = get_workload(spec.workload)
    return train(spec, rank, meta, [workload.step_batch(spec, step) for step in range(spec.steps)], spec)


def run_trainer_epochs_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """continuity.py's epochs cell through the Trainer: epochs, schedule and eval are the Trainer's own."""
    if spec.steps % BATCHES_PER_EPOCH or spec.steps < 2 * BATCHES_PER_EPOCH:
        raise SpecError(f"{spec.cell_id}: steps={spec.steps} must be two or more epochs of {BATCHES_PER_EPOCH} batches")
    fault, workload = supported_fault(spec, (WorkloadFault, EpochFault)), get_workload(spec.workload)
    trace = train(spec, rank, meta, [workload.step_batch(spec, step) for step in range(BATCHES_PER_EPOCH)], with_schedule(spec),
                  eval_batch=workload.step_batch(spec, HELD_OUT_STEP), callbacks=lambda trainer: [EpochSeams(trainer, fault)],
                  max_steps=-1, num_train_epochs=spec.steps // BATCHES_PER_EPOCH,
                  eval_strategy="steps", eval_steps=EVAL_EVERY, per_device_eval_batch_size=spec.global_batch // spec.world_size,
                  prediction_loss_only=True)
    trace.meta.update(batches_per_epoch=BATCHES_PER_EPOCH, eval_steps=list(range(EVAL_EVERY - 1, spec.steps, EVAL_EVERY)))
    return trace
