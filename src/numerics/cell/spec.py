"""`RunSpec`: one cell of the matrix, and the DeepSpeed config it renders.

A cell is data: it travels to the ranks by pickle, names itself in pytest ids
and reports, and renders its DeepSpeed config from the readable templates in
``ds_configs/`` so that what Numerics runs is what a user could copy.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

from numerics.cell.invariant_sets import DEFAULT_INVARIANTS, INVARIANT_NAMES

DTYPES = ("fp32", "bf16", "fp16")
COMM_DTYPES = (None, "fp32", "fp16", "bf16")
MODELS = ("llama", "mlp")
OPTIMIZERS = ("adamw", "sgd")
OPTIMIZER_SOURCES = ("config", "client")
BUCKETS = ("scaled", "default")
DRIVERS = ("engine", "trainer", "resume", "epochs", "trainer_epochs")  # see run/drivers.py
TRAINER_DRIVERS = ("trainer", "trainer_epochs")
# Which loss a Trainer cell backpropagates (trainer_driver.py): "stock" is what most users run,
# the model's own loss from ``labels`` with the Trainer's token counting, sampler and sharding;
# "custom" overrides ``compute_loss`` with the workload's loss and feeds the micro-batches in order.
TRAINER_LOSSES = ("stock", "custom")

# Keys of the ZeRO templates that are scaled to the tiny model; the
# ``buckets="default"`` cells drop them to run DeepSpeed's own defaults.
SCALED_ZERO_KEYS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)

OPTIMIZER_DEFAULTS = {
    # betas/eps/weight decay are spelled out so the reference run and the
    # DeepSpeed config cannot silently disagree on a default.
    "adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
    "sgd": {"momentum": 0.9},
}

# Learning rates per optimizer: AdamW normalises the gradient, SGD does not.
DEFAULT_LR = {"adamw": 3e-3, "sgd": 0.1}
LORA_LR = {"adamw": 1e-2, "sgd": 0.3}  # adapters start at zero (B = 0) and have few parameters

# Inside the package, so an installed wheel has them (package data, pyproject.toml); the
# repository root links to them as ds_configs/ for readers.
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"


def matches(fields: dict[str, Any], pattern: dict[str, Any]) -> bool:
    """Whether a cell's RunSpec fields match a pattern of fields, as the data tables write cells
    (known deviations, expected n/a, unlogged figures): a tuple value means one of."""
    return all(fields.get(k) in v if isinstance(v, tuple) else fields.get(k) == v for k, v in pattern.items())


class SpecError(ValueError):
    """A RunSpec that cannot describe a sane run; the message says which field and why."""


@cache
def load_template(name: str) -> dict[str, Any]:
    """A template from ``ds_configs/``, without its ``_comment``."""
    path = DS_CONFIG_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"DeepSpeed config template {path} is missing") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"DeepSpeed config template {path} is not valid JSON: {err}") from None
    data.pop("_comment", None)
    return data


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, recursing into nested dicts; neither is modified."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class RunSpec:
    """One training run: model, precision, ZeRO stage, communication dtype, sizes and seed."""

    model: str = "llama"
    dtype: str = "fp32"
    zero_stage: int = 0
    comm_dtype: str | None = None
    world_size: int = 2
    micro_batch: int = 4
    grad_accum: int = 1
    steps: int = 16
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    optimizer: str = "adamw"
    optimizer_source: str = "config"
    buckets: str = "scaled"
    seed: int = 0
    seq_len: int = 32
    driver: str = "engine"
    trainer_loss: str = "stock"  # one of TRAINER_LOSSES; trainer drivers only
    workload: str = "markov"
    lora: bool = False  # wrap the model with PEFT LoRA adapters (see lora.py)
    base_dtype: str = "fp32"  # dtype the base model is loaded in; matters where DeepSpeed precision is off
    fault: str | None = None
    timeout_s: float = 180.0
    # Extra DeepSpeed keys as JSON text, merged last (a frozen dataclass needs a hashable field).
    ds_extra: str = "{}"
    tags: tuple[str, ...] = field(default=())
    invariants: tuple[str, ...] = DEFAULT_INVARIANTS

    def __post_init__(self) -> None:
        if self.lr is None and self.optimizer in DEFAULT_LR:
            object.__setattr__(self, "lr", (LORA_LR if self.lora else DEFAULT_LR)[self.optimizer])
        self.validate()

    # -- identity -----------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def grad_clip(self) -> float:
        """The global grad norm DeepSpeed clips at (``gradient_clipping`` in ``ds_extra``); 0: none."""
        return json.loads(self.ds_extra).get("gradient_clipping", 0.0)

    @property
    def cell_id(self) -> str:
        """Readable id: ``zero2-bf16-comm_fp32-ws2`` plus whatever differs from the defaults."""
        parts = [f"zero{self.zero_stage}", self.dtype]
        if self.comm_dtype:
            parts.append(f"comm_{self.comm_dtype}")
        parts.append(f"ws{self.world_size}")
        if self.grad_accum != 1:
            parts.append(f"ga{self.grad_accum}")
        if self.model != "llama":
            parts.append(self.model)
        if self.lora:
            parts.append(f"lora_base_{self.base_dtype}")
        if self.optimizer != "adamw" or self.optimizer_source != "config":
            parts.append(f"{self.optimizer_source}_{self.optimizer}")
        if self.grad_clip:
            parts.append(f"clip{self.grad_clip:g}")
        if self.buckets != "scaled":
            parts.append(f"buckets_{self.buckets}")
        if self.driver != "engine":
            parts.append(self.driver)
        if self.trainer_loss != "stock":
            parts.append(f"loss_{self.trainer_loss}")
        if self.workload != "markov":
            parts.append(self.workload)
        if self.seed:
            parts.append(f"seed{self.seed}")
        if self.fault:
            parts.append(f"fault_{self.fault}")
        parts.extend(self.tags)
        return "-".join(parts)

    def with_(self, **changes: Any) -> RunSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown RunSpec field(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        for name in ("tags", "invariants"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)

    # -- validation -----------------------------------------------------------------
    def validate(self) -> None:
        def one_of(name: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise SpecError(f"{name}={value!r} is not one of {allowed}")

        one_of("model", self.model, MODELS)
        one_of("dtype", self.dtype, DTYPES)
        one_of("base_dtype", self.base_dtype, DTYPES)
        one_of("comm_dtype", self.comm_dtype, COMM_DTYPES)
        one_of("zero_stage", self.zero_stage, (0, 1, 2, 3))
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("optimizer_source", self.optimizer_source, OPTIMIZER_SOURCES)
        one_of("buckets", self.buckets, BUCKETS)
        one_of("driver", self.driver, DRIVERS)
        one_of("trainer_loss", self.trainer_loss, TRAINER_LOSSES)
        if self.trainer_loss != "stock" and self.driver not in TRAINER_DRIVERS:
            raise SpecError(f"trainer_loss={self.trainer_loss!r} needs a Trainer driver {TRAINER_DRIVERS}, not {self.driver!r}")
        from numerics.cell.workloads import WORKLOADS  # late: workloads import torch

        one_of("workload", self.workload, tuple(WORKLOADS))
        for name in ("world_size", "micro_batch", "grad_accum", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpecError(f"{name}={value!r} must be a positive integer")
        if self.lora and self.model != "llama":
            raise SpecError("lora=True needs model='llama' (LoRA targets its attention and MLP projections)")
        if self.base_dtype != "fp32" and not self.lora:
            raise SpecError(f"base_dtype={self.base_dtype!r} needs lora=True: full fine-tuning loads fp32 and lets `dtype` cast")
        if self.seq_len < 2:
            raise SpecError(f"seq_len={self.seq_len} must be at least 2 (one input, one target)")
        if not self.lr > 0:
            raise SpecError(f"lr={self.lr!r} must be positive")
        if self.timeout_s <= 0:
            raise SpecError(f"timeout_s={self.timeout_s!r} must be positive")
        try:
            extra = json.loads(self.ds_extra)
        except json.JSONDecodeError as err:
            raise SpecError(f"ds_extra is not valid JSON: {err}") from None
        if not isinstance(extra, dict):
            raise SpecError(f"ds_extra must be a JSON object, got {type(extra).__name__}")
        for key in ("fp16", "bf16", "zero_optimization", "train_batch_size"):
            if key in extra:
                raise SpecError(
                    f"ds_extra sets {key!r}, which the RunSpec owns (dtype, zero_stage, batch fields); "
                    "set those fields instead so the cell id says what ran"
                )
        unknown = sorted(set(self.invariants) - set(INVARIANT_NAMES))
        if unknown:
            raise SpecError(f"unknown invariant(s) {unknown}; known: {sorted(INVARIANT_NAMES)}")
        if self.fault is not None:
            from numerics.cell.faults import get_fault  # late: faults import torch

            try:
                get_fault(self.fault)
            except (KeyError, ValueError) as err:
                raise SpecError(str(err).strip('"')) from None

    # -- DeepSpeed config -------------------------------------------------------------
    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config for this cell, rendered from ``ds_configs/``."""
        config = deep_merge(load_template("base"), load_template(f"zero{self.zero_stage}"))
        if self.buckets == "default":
            for key in SCALED_ZERO_KEYS:
                config["zero_optimization"].pop(key, None)
        if self.dtype != "fp32":
            config = deep_merge(config, load_template(self.dtype))
        if self.comm_dtype is not None:
            config["communication_data_type"] = self.comm_dtype
        config["train_micro_batch_size_per_gpu"] = self.micro_batch
        config["gradient_accumulation_steps"] = self.grad_accum
        config["train_batch_size"] = self.global_batch
        if self.optimizer_source == "config":
            config["optimizer"] = {
                "type": {"adamw": "AdamW", "sgd": "SGD"}[self.optimizer],
                "params": {"lr": self.lr, **OPTIMIZER_DEFAULTS[self.optimizer]},
            }
        return deep_merge(config, json.loads(self.ds_extra))
