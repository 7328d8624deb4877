"""Drivers "trainer" and "trainer_epochs": the engine and epochs drivers' cells, trained through
``transformers.Trainer``.

Fine-tuning users rarely call ``deepspeed.initialize`` themselves; they hand a
DeepSpeed config to ``TrainingArguments`` and let the Trainer and accelerate
build the engine, scale the loss, count tokens, sample, shard, step, evaluate
and log. The default, ``trainer_loss="stock"``, runs exactly that: the model's
own loss from ``labels``, the Trainer's own ``num_items_in_batch``, random
sampler and accelerate's sharding over a dataset of every step's samples. The
driver only observes: ``compute_loss`` is the Trainer's, wrapped to record which
samples each micro-batch held (found by content) and their token losses, and the
measurements wrap ``engine.step``, because accelerate steps the engine inside
``accelerator.backward`` (the ``on_pre_optimizer_step`` callback fires after the
update, too late). The samples each step got go to ``meta["step_samples"]``, and
the reference trains on them. ``trainer_loss="custom"`` is the user who brings
their own loss: ``compute_loss`` returns the workload's loss, and the train
dataloader is this rank's micro-batches in order, as the engine driver feeds them.

Releases differ in how they step: some call ``engine.step`` on every micro-batch
(DeepSpeed applies the update only at its accumulation boundary), some only at
the boundary, so a step is measured where DeepSpeed applies it, and the count is
checked against ``engine.global_steps``. Every figure the Trainer logs is kept
beside the measured one (``extra["logged"]``) for ``logged_matches``; clipping
is on at a bound that never bites, since some releases log the grad norm only
when clipping is on.

``trainer_epochs`` is continuity.py's epochs cell under the Trainer: one
epoch's batches as a finite dataset, ``num_train_epochs`` over it, the same
warm-up/decay DeepSpeed scheduler, and the Trainer's own step-scheduled eval
on the held-out batch, measured beside it. That eval is where incident 4 hid:
it silently stopped appearing.

Faults: workload faults act inside the workload and need no seam (a loss fault
only where the workload's loss is trained, ``custom``); the epoch faults act
through callbacks at the Trainer's epoch start and eval decision; a logging
fault at ``Trainer.log``. Faults at the engine's backward or reduction have no
seam here and are refused.
"""
from __future__ import annotations

import os
import tempfile
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, SequentialSampler
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from numerics.cell.data import micro_batch_indices
from numerics.cell.faults import EpochFault, Fault, LoggingFault, LossFault, TrainerArgumentsFault, WorkloadFault, get_fault
from numerics.cell.label_mask import supervised_count
from numerics.cell.models import build_model, causal_lm_loss, tensor_checksum
from numerics.cell.spec import OPTIMIZER_DEFAULTS, RunSpec, SpecError, matches
from numerics.cell.workloads import Batch, get_workload, slice_batch
from numerics.judge.invariants import LOGGED_FIGURES
from numerics.judge.thresholds import THRESHOLDS
from numerics.judge.trace import Trace
from numerics.run.continuity import BATCHES_PER_EPOCH, EVAL_EVERY, HELD_OUT_STEP, with_schedule
from numerics.run.drivers import torch_linear
from numerics.run.train import measure_step
from numerics.versions import compat

Sample = dict[str, torch.Tensor]

# Figures a Trainer cannot log in some cells, with the reason; ``logged_matches`` reads them as
# n/a there and fails on any other figure missing.
UNLOGGED: tuple[tuple[dict[str, Any], str, str], ...] = (
    ({"zero_stage": 0, "dtype": "fp32"}, "grad_norm",
     "DeepSpeed's ZeRO-0 fp32 engine computes no global grad norm (get_global_grad_norm() is None)"),
)


def unlogged(spec: RunSpec) -> dict[str, str]:
    """The figures ``spec``'s cell declares its Trainer cannot log, with the reason."""
    return {figure: why for cell, figure, why in UNLOGGED if matches(spec.to_dict(), cell)}


def clip_bound(spec: RunSpec) -> float:
    """The ``max_grad_norm`` a Trainer cell runs with: the cell's clipping bound, else one that
    never bites (thresholds.py)."""
    return spec.grad_clip or THRESHOLDS.unbiting_clip


def training_arguments(spec: RunSpec, output_dir: str, **overrides: Any) -> TrainingArguments:
    """Arguments that agree with the cell's DeepSpeed config key for key, so the Trainer finds no
    mismatch (its scheduler's warm-up included). The one "auto" is the clipping bound, as HF's
    example configs write it: the Trainer fills it from ``max_grad_norm``. A client optimizer is the
    Trainer's own (``optim``): under DeepSpeed, ``deepspeed_init`` drops one passed as
    ``optimizers=(opt, None)``."""
    config, defaults = {**spec.ds_config(), "gradient_clipping": "auto"}, OPTIMIZER_DEFAULTS[spec.optimizer]
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
        adam_epsilon=defaults.get("eps", 1e-8), max_grad_norm=clip_bound(spec),
        bf16=spec.dtype == "bf16", fp16=spec.dtype == "fp16", seed=spec.seed,
        logging_steps=1, logging_nan_inf_filter=False, report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    return compat.training_arguments(**{**arguments, **overrides})


def rows(batch: Batch) -> list[Sample]:
    """A batch as the per-sample dicts a Trainer dataset holds."""
    return [{key: value[row] for key, value in batch.items()} for row in range(len(batch["input_ids"]))]


def rank_samples(spec: RunSpec, rank: int, batches: list[Batch]) -> list[Sample]:
    """This rank's samples in training order: its micro-batches, step-major, as the engine driver feeds them."""
    return [sample for batch in batches for micro in range(spec.grad_accum)
            for sample in rows(slice_batch(batch, micro_batch_indices(spec.global_batch, spec.micro_batch, spec.grad_accum,
                                                                      spec.world_size, rank, micro)))]


class MicroBatchLog:
    """What the training micro-batches since the last optimizer step held and cost: their sample
    ids, found by content in ``batches`` (sample ``i`` of batch ``s`` is id ``s * len(batch) + i``,
    the workload's numbering), and their summed token losses and target counts."""

    def __init__(self, batches: list[Batch]) -> None:
        ids = torch.cat([batch["input_ids"] for batch in batches])
        self.ids_by_content = {row.numpy().tobytes(): index for index, row in enumerate(ids)}
        self.samples: list[int] = []
        self.token_loss, self.tokens = 0.0, 0

    def record(self, input_ids: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        contents = [row.numpy().tobytes() for row in input_ids.detach().cpu()]
        if any(content not in self.ids_by_content for content in contents):
            raise RuntimeError("a training micro-batch holds a sample that is not in the dataset: the samples were changed on their way to the model")
        self.samples += [self.ids_by_content[content] for content in contents]
        count = supervised_count(labels)
        self.token_loss += float(causal_lm_loss(logits.detach(), labels)) * count
        self.tokens += count

    def take_step(self, device: torch.device) -> tuple[list[int], float]:
        """Every rank's sample ids of this step, sorted, and their token-mean loss, the loss a
        correct run trains on; then starts the next step. Collective."""
        gathered: list[list[int]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, self.samples)
        totals = torch.tensor([self.token_loss, float(self.tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        self.samples, self.token_loss, self.tokens = [], 0.0, 0
        return sorted(sample for rank_ids in gathered for sample in rank_ids), float(totals[0] / totals[1])


class ObservedTrainer(Trainer):
    """The stock Trainer, observed: its own ``compute_loss``, each training micro-batch recorded.
    ``Trainer.log`` is the seam of logging faults."""

    def __init__(self, spec: RunSpec, log: MicroBatchLog, fault: Fault, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec, self.micro_batches, self.fault = spec, log, fault

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        """The loss this Trainer trains on (``kwargs`` as the release passes them, ``num_items_in_batch``
        where it counts tokens), with the micro-batch recorded when training."""
        input_ids, labels = inputs["input_ids"], inputs["labels"]  # before a release's compute_loss pops labels
        loss, outputs = self.loss_and_outputs(model, inputs, **kwargs)
        if model.training:
            self.micro_batches.record(input_ids, labels, outputs.logits)
        return (loss, outputs) if return_outputs else loss

    def loss_and_outputs(self, model: Any, inputs: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, Any]:
        return super().compute_loss(model, inputs, return_outputs=True, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        self.fault.alter_logs(logs, self.spec)
        super().log(logs, *args, **kwargs)


class CustomLossTrainer(ObservedTrainer):
    """A Trainer that feeds the cell's micro-batches in order and backpropagates the workload's loss.

    The engine driver hands ``workload.loss`` of each micro-batch to ``engine.backward``, which
    divides it by GA. Releases whose Trainer passes ``scale_wrt_gas=False`` to accelerate divide
    by GA themselves unless told the loss is already scaled for it: it is not
    (``loss_is_scaled_for_ga``), so the gradient is the engine driver's. The Trainer's own token
    counting (``num_items_in_batch``) is off: the workload normalises its loss, ``padded`` by the
    step's global target count."""

    loss_is_scaled_for_ga = False

    def __init__(self, spec: RunSpec, log: MicroBatchLog, fault: Fault, **kwargs: Any) -> None:
        super().__init__(spec, log, fault, **kwargs)
        self.workload = get_workload(spec.workload)
        self.model_accepts_loss_kwargs = False

    def get_train_dataloader(self) -> DataLoader:
        """Sequential and unsharded: the dataset is already this rank's share, in order, and
        accelerate's prepare would deal its batches round-robin across ranks again."""
        return DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size, sampler=SequentialSampler(self.train_dataset),
                          collate_fn=self.data_collator, num_workers=0)

    def loss_and_outputs(self, model: Any, inputs: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The workload's loss of the micro-batch (eval batches included)."""
        outputs = model(**inputs)
        return self.workload.loss(outputs, inputs, self.spec), outputs


class StepProbe(TrainerCallback):
    """Measures each optimizer step around ``engine.step``, where DeepSpeed applies it, and
    collects what the Trainer logged beside it.

    ``batches`` is the dataset, one epoch: the custom loss trains step ``s`` on ``batches[s % len(batches)]``."""

    def __init__(self, trainer: ObservedTrainer, spec: RunSpec, batches: list[Batch], trace: Trace) -> None:
        self.trainer, self.spec, self.batches, self.trace = trainer, spec, batches, trace
        self.workload, self.engine = get_workload(spec.workload), None
        trace.meta["step_samples"] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.engine = compat.trainer_engine(self.trainer)
        self.engine.step = partial(self._step, self.engine.step)  # this instance only; destroyed after the cell

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the step's batch as the engine loop does before its micro-batches: the custom
        ``padded`` loss normalises each micro-batch by the target count of the step it built last."""
        self.workload.step_batch(self.spec, state.global_step % len(self.batches))

    def _step(self, step_fn: Callable[[], Any]) -> Any:
        """``engine.step``: measured at the accumulation boundary; a call before it (releases that
        step every micro-batch) only lets DeepSpeed count the micro-step."""
        if not self.engine.is_gradient_accumulation_boundary():
            return step_fn()
        step = len(self.trace.steps)
        sample_ids, loss = self.trainer.micro_batches.take_step(self.engine.device)
        record, grads = measure_step(self.engine, self.spec, step, self.workload.batch_of(self.spec, sample_ids),
                                     [torch.tensor(loss)], step_fn)  # already the global mean: the same on every rank
        if not self.spec.grad_clip and not record.grad_norm < THRESHOLDS.unbiting_clip:
            raise RuntimeError(f"{self.spec.cell_id} step {step}: grad norm {record.grad_norm:.6g} reached the clipping bound "
                               f"{THRESHOLDS.unbiting_clip:g} that Trainer cells rely on never biting; the reference does not clip")
        self.trace.steps.append(record)
        self.trace.meta["step_samples"].append(sample_ids)
        if step == 0:
            self.trace.step0_grads = {k: v.numpy() for k, v in grads.items()}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        figures = {name: logs[name] for name in LOGGED_FIGURES if name in (logs or {})}
        if figures:
            self.trace.steps[state.global_step - 1].extra.setdefault("logged", {}).update(figures)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.engine.global_steps != len(self.trace.steps):
            raise RuntimeError(f"{self.spec.cell_id}: DeepSpeed applied {self.engine.global_steps} optimizer steps, "
                               f"the probe measured {len(self.trace.steps)}")


class EvalProbe(TrainerCallback):
    """Measures the held-out loss whenever the Trainer evaluates, beside the ``eval_loss`` it logs:
    the token mean of the whole held-out batch, the same forward on every rank (ZeRO-3 gathers)."""

    def __init__(self, trainer: ObservedTrainer, held_out: Batch, trace: Trace) -> None:
        self.trainer, self.held_out, self.trace = trainer, held_out, trace

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        engine = compat.trainer_engine(self.trainer)
        inputs = {key: value.to(engine.device) for key, value in self.held_out.items()}
        with torch.no_grad():
            loss = causal_lm_loss(engine.module(**inputs).logits, inputs["labels"])
        self.trace.steps[state.global_step - 1].eval_loss = float(loss)


class EpochSeams(TrainerCallback):
    """The epochs driver's fault seams at the Trainer's own epoch start and eval decision."""

    def __init__(self, trainer: ObservedTrainer, fault: Fault) -> None:
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
    """Undo what a Trainer leaves in a persistent rank (drivers.py restores what every driver
    leaves): its engine; the global DeepSpeed config, which makes a later ``from_config``
    build under ``zero.Init``; accelerate's singletons (resetting them keeps the process group,
    accelerate adopts it again); and the environment, where accelerate leaves
    ``ACCELERATE_USE_DEEPSPEED=true`` for every later TrainingArguments."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    engine = getattr(trainer, "deepspeed", None)
    if hasattr(engine, "destroy"):  # a Trainer that never engaged DeepSpeed holds none
        engine.destroy()
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update(environ)


def supported_fault(spec: RunSpec) -> Fault:
    """The cell's fault, if it acts at a seam this driver has; refused otherwise, never silently inert."""
    fault = get_fault(spec.fault)
    seams = (WorkloadFault, LoggingFault, TrainerArgumentsFault) + ((EpochFault,) if spec.driver == "trainer_epochs" else ())
    if spec.fault is not None and (not isinstance(fault, seams) or (isinstance(fault, LossFault) and spec.trainer_loss == "stock")):
        raise ValueError(f"{spec.cell_id}: fault {spec.fault} has no seam in the {spec.driver} driver "
                         f"with the {spec.trainer_loss} loss (it acts on {type(fault).__name__}'s seam)")
    return fault


def train(spec: RunSpec, rank: int, meta: dict[str, Any], batches: list[Batch], arguments_spec: RunSpec,
          eval_batch: Batch | None = None, callbacks: Callable[[ObservedTrainer, Fault], list[TrainerCallback]] = lambda trainer, fault: [],
          **arguments: Any) -> Trace:
    """Train ``spec`` through a Trainer over ``batches`` (one epoch), with ``arguments_spec``'s
    DeepSpeed config and ``arguments``; the Trainer's eval, if scheduled, is on ``eval_batch``
    (accelerate deals it across the ranks). This rank's checksums only."""
    fault, model, workload = supported_fault(spec), build_model(spec.model, spec.seed), get_workload(spec.workload)
    trace = Trace(cell=spec.cell_id, spec=spec.to_dict(), init_checksum=tensor_checksum(list(model.parameters())),
                  meta={**meta, "driver": spec.driver, "inherited_state": inherited_state(), "unlogged": unlogged(spec)},
                  entropy_floor=workload.entropy_floor(spec, THRESHOLDS.entropy_floor_sigmas),
                  entropy_rate=workload.entropy_rate())
    trainer_class, dataset = ((ObservedTrainer, [sample for batch in batches for sample in rows(batch)]) if spec.trainer_loss == "stock"
                              else (CustomLossTrainer, rank_samples(spec, rank, batches)))
    trainer, environ = None, dict(os.environ)
    try:
        with tempfile.TemporaryDirectory(prefix="numerics-trainer-") as output_dir:
            trainer = trainer_class(spec, MicroBatchLog(batches), fault, model=model, train_dataset=dataset,
                                    eval_dataset=None if eval_batch is None else rows(eval_batch),
                                    args=training_arguments(arguments_spec, output_dir, **{**arguments, **fault.trainer_arguments()}))
            trainer.remove_callback(PrinterCallback)
            probes = [StepProbe(trainer, spec, batches, trace)] + ([EvalProbe(trainer, eval_batch, trace)] if eval_batch is not None else [])
            for callback in probes + callbacks(trainer, fault):
                trainer.add_callback(callback)
            trainer.train()
    finally:
        release(trainer, environ)
    return trace


def run_trainer_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """Train one cell on this rank through ``transformers.Trainer`` over a dataset of every step's batch."""
    workload = get_workload(spec.workload)
    return train(spec, rank, meta, [workload.step_batch(spec, step) for step in range(spec.steps)], spec)


def run_trainer_epochs_cell(spec: RunSpec, rank: int, meta: dict[str, Any]) -> Trace:
    """continuity.py's epochs cell through the Trainer: epochs, schedule and eval are the Trainer's own."""
    if spec.steps % BATCHES_PER_EPOCH or spec.steps < 2 * BATCHES_PER_EPOCH:
        raise SpecError(f"{spec.cell_id}: steps={spec.steps} must be two or more epochs of {BATCHES_PER_EPOCH} batches")
    workload = get_workload(spec.workload)
    trace = train(spec, rank, meta, [workload.step_batch(spec, step) for step in range(BATCHES_PER_EPOCH)], with_schedule(spec),
                  eval_batch=workload.step_batch(spec, HELD_OUT_STEP), callbacks=lambda trainer, fault: [EpochSeams(trainer, fault)],
                  max_steps=-1, num_train_epochs=spec.steps // BATCHES_PER_EPOCH,
                  eval_strategy="steps", eval_steps=EVAL_EVERY, per_device_eval_batch_size=spec.global_batch // spec.world_size,
                  prediction_loss_only=True)
    trace.meta.update(batches_per_epoch=BATCHES_PER_EPOCH, eval_steps=list(range(EVAL_EVERY - 1, spec.steps, EVAL_EVERY)))
    return trace
