"""`Trace`: what one run did, step by step, plus the metadata to reproduce it.

A field a run could not measure is ``None`` (not applicable), never a
made-up value, so an invariant over it reports n/a instead of passing.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class StepRecord:
    step: int
    loss: float  # mean over the global batch, the same on every rank
    grad_norm: float | None = None  # global L2 norm of the true (unscaled, reduced) gradient, computed by Numerics
    grad_norm_reported: float | None = None  # what the engine reports (what users log and clip by)
    loss_scale: float | None = None  # fp16 only
    skipped: bool | None = None  # fp16 overflow skip
    lr: float | None = None
    update_norm: float | None = None  # ||params after - params before||
    param_norm: float | None = None
    param_checksums: list[str] = field(default_factory=list)  # one per rank, after the step
    # ZeRO-3, one per rank: for each trainable parameter, the norm of this step's update of the rank's
    # own slice of the fp32 master (what it alone holds). The reference records one per slice of the
    # same layout (reference.partition_updates).
    partition_updates: list[dict[str, float]] = field(default_factory=list)
    # ZeRO-3, one per rank: max |GatheredParameters view - fp32 master in the module dtype| after the step
    gathered_errors: list[float] = field(default_factory=list)
    oracle_loss: float | None = None  # the batch's mean surprisal under the true chain
    supervised_tokens: int | None = None
    eval_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trace:
    cell: str
    spec: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    init_checksum: str | None = None
    # Step-0 per-parameter gradients (fp32, unscaled, full): kept in memory for
    # the tight step-0 comparison, summarised by norm when serialised.
    step0_grads: dict[str, np.ndarray] | None = None
    entropy_floor: float | None = None  # H minus the noise margin for this batch size
    entropy_rate: float | None = None

    def values(self, name: str) -> list[Any]:
        return [getattr(record, name) for record in self.steps]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.step0_grads is not None:
            data["step0_grads"] = {k: float(np.linalg.norm(v)) for k, v in self.step0_grads.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trace:
        data = dict(data)
        data["steps"] = [StepRecord(**s) for s in data.get("steps", [])]
        data["step0_grads"] = None  # only norms were serialised
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> Trace:
        return cls.from_json(json.loads(path.read_text()))
