"""Driver "trainer": the engine driver's cell, trained through ``transformers.Trainer``.

Fine-tuning users rarely call ``deepspeed.initialize`` themselves; they hand a
DeepSpeed config to ``TrainingArguments`` and let the Trainer and accelerate
build the engine, scale the loss, step and log. This driver runs that path on
the same model, data and global batches as the engine driver, and measures
around the engine the same way, so both drivers answer to the same invariants.

Two Trainer defaults are defeated on purpose: the train dataloader is this
rank's micro-batches in order (no shuffling, no accelerate sharding), and the
measurements wrap ``engine.step`` itself, because accelerate's DeepSpeed
wrapper steps the engine inside ``accelerator.backward``: the Trainer's
``on_pre_optimizer_step`` callback fires after the update, too late.
"""
from __future__ import annotations

import os
import tempfile
import time
from functools import partial
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from numerics.data import micro_batch_indices
from numerics.models import build_model, causal_lm_loss, tensor_checksum
from numerics.spec import OPTIMIZER_DEFAULTS, RunSpec
from numerics.trace import Trace
from numerics.cells import torch_linear
from numerics.train import measure_step
from numerics.workloads import Batch, get_workload, slice_batch


def training_arguments(spec: RunSpec, output_dir: str) -> TrainingArguments:
    """Arguments that agree with ``spec.ds_config()`` key for key, so the Trainer fills no
    "auto" and finds no mismatch. A client optimizer is the Trainer's own (``optim``): under
    DeepSpeed, ``deepspeed_init`` drops one passed as ``optimizers=(opt, None)``."""
    config, defaults = spec.ds_config(), OPTIMIZER_DEFAULTS[spec.optimizer]
    betas = defaults.get("betas", (0.9, 0.999))
    return TrainingArguments(
        output_dir=output_dir, deepspeed=config, use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=spec.micro_batch, gradient_accumulation_steps=spec.grad_accum,
        max_steps=spec.steps, learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch" if spec.optimizer == "adamw" else "sgd",
        optim_args=None if spec.optimizer == "adamw" else f"momentum={defaults['momentum']}",
        weight_decay=defaults.get("weight_decay", 0.0), adam_beta1=betas[0], adam_beta2=betas[1],
        adam_epsilon=defaults.get("eps", 1e-8), max_grad_norm=config["gradient_clipping"],
        bf16=spec.dtype == "bf16", fp16=spec.dtype == "fp16", seed=spec.seed,
        logging_steps=1, logging_nan_inf_filter=False, report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )


def rank_samples(spec: RunSpec, rank: int, batches: list[Batch]) -> list[dict[str, torch.Tensor]]:
    """This rank's samples in training order: its micro-batches, step-major, as the engine driver feeds them."""
    micros = [slice_batch(batch, micro_batch_indices(spec.global_batch, spec.micro_batch, spec.grad_accum, spec.world_size, rank, micro))
              for batch in batches for micro in range(spec.grad_accum)]
    return [{key: value[row] for key, value in micro.items()} for micro in micros for row in range(spec.micro_batch)]


class NumericsTrainer(Trainer):
    """A Trainer that feeds the cell's micro-batches in order and keeps each one's true mean loss."""

    def __init__(self, samples: list[dict[str, torch.Tensor]], **kwargs: Any) -> None:
        super().__init__(train_dataset=samples, **kwargs)
        self.micro_losses: list[torch.Tensor] = []

    def get_train_dataloader(self) -> DataLoader:
        """Sequential and unsharded: the dataset is already this rank's share, in order, and
        accelerate's prepare would deal its batches round-robin across ranks again."""
        return DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size, sampler=SequentialSampler(self.train_dataset),
                          collate_fn=self.data_collator, num_workers=0)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The Trainer's loss, plus the micro-batch mean recomputed from the logits: the Trainer's
        own is rescaled by its token count across ranks and accumulation steps. (The recomputation
        is the causal-LM mean the workload's loss is; a workload with another loss needs its own.)"""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.micro_losses.append(causal_lm_loss(outputs.logits.detach(), inputs["labels"]))
        return (loss, outputs) if return_outputs else loss


class StepProbe(TrainerCallback):
    """Measures each optimizer step around ``engine.step`` and collects what the Trainer logged."""

    def __init__(self, trainer: NumericsTrainer, spec: RunSpec, batches: list[Batch], trace: Trace) -> None:
        self.trainer, self.spec, self.batches, self.trace = trainer, spec, batches, trace

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        engine = self.trainer.deepspeed
        engine.step = partial(self._measured_step, engine, engine.step)  # this instance only; destroyed after the cell

    def _measured_step(self, engine: Any, step_fn: Callable[[], Any]) -> None:
        step = len(self.trace.steps)
        record, grads = measure_step(engine, self.spec, step, self.batches[step], self.trainer.micro_losses, step_fn)
        self.trainer.micro_losses.clear()
        self.trace.steps.append(record)
        if step == 0:
            self.trace.step0_grads = {k: v.numpy() for k, v in grads.items()}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            record = self.trace.steps[state.global_step - 1]
            record.grad_norm_reported = logs.get("grad_norm")
            record.extra.update(logged_loss=logs["loss"], logged_lr=logs.get("learning_rate"))


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


def run_trainer_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """Train one cell on this rank through ``transformers.Trainer``; this rank's checksums only."""
    if spec.fault is not None:
        raise ValueError(f"{spec.cell_id}: faults act on the engine driver's loop; the trainer driver has no seam for them")
    started = time.perf_counter()
    model, workload = build_model(spec.model, spec.seed), get_workload(spec.workload)
    trace = Trace(cell=spec.cell_id, spec=spec.to_dict(), meta={**meta, "driver": "trainer", "inherited_state": inherited_state()},
                  init_checksum=tensor_checksum(list(model.parameters())),
                  entropy_floor=workload.entropy_floor(spec), entropy_rate=workload.entropy_rate())
    batches = [workload.step_batch(spec, step) for step in range(spec.steps)]
    trainer, environ = None, dict(os.environ)
    try:
        with tempfile.TemporaryDirectory(prefix="numerics-trainer-") as output_dir:
            trainer = NumericsTrainer(rank_samples(spec, rank, batches), model=model,
                                      args=training_arguments(spec, output_dir))
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(StepProbe(trainer, spec, batches, trace))
            trainer.train()
    finally:
        release(trainer, environ)
    trace.meta["wall_s"] = time.perf_counter() - started
    trace.meta["steps_per_s"] = spec.steps / trace.meta["wall_s"]
    return trace
