"""Workloads: what a cell trains on, and how its loss is normalised.

The training loop and the reference ask the workload for a step's global batch
(a dict of tensors in global sample order), slice it per rank and micro-step,
and ask it for the loss of a micro-batch. The default, ``markov``, streams
fresh sequences from the Markov chain (data.py) and has a known entropy floor;
a workload without one (e.g. one that overfits on purpose) says so, and the
entropy-floor invariant reports n/a for it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from numerics.data import global_batch, markov_chain
from numerics.thresholds import THRESHOLDS

Batch = dict[str, torch.Tensor]


class MarkovStream:
    """Fresh Markov-chain sequences every step; labels are the inputs (HF shifts them)."""

    name = "markov"

    def step_batch(self, spec: Any, step: int) -> Batch:
        ids = global_batch(markov_chain(), spec.seq_len, spec.seed, step, spec.global_batch)
        return {"input_ids": ids, "labels": ids}

    def loss(self, output: Any, micro: Batch, spec: Any) -> torch.Tensor:
        return output.loss

    def supervised_tokens(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def oracle_loss(self, batch: Batch) -> float | None:
        """Mean surprisal of the batch's next tokens under the true chain."""
        src, dst = batch["input_ids"][:, :-1].numpy(), batch["input_ids"][:, 1:].numpy()
        return float(-np.log(markov_chain().transition[src, dst]).mean())

    def entropy_rate(self) -> float | None:
        return markov_chain().entropy_rate

    def entropy_floor(self, spec: Any) -> float | None:
        return markov_chain().floor(spec.global_batch * (spec.seq_len - 1), THRESHOLDS.entropy_floor_sigmas)


WORKLOADS = {workload.name: workload for workload in [MarkovStream()]}


def get_workload(name: str) -> MarkovStream:
    return WORKLOADS[name]


def slice_batch(batch: Batch, indices: range) -> Batch:
    return {key: value[list(indices)] for key, value in batch.items()}
