"""Workloads: what a cell trains on, and how its loss is normalised.

The training loop and the reference ask the workload for a step's global batch
(a dict of tensors in global sample order, holding only keys the model takes:
the loop passes every key to the forward), slice it per rank and micro-step,
and ask it for the loss of a micro-batch. The default, ``markov``, streams
fresh sequences from the Markov chain (data.py) and has a known entropy floor;
a workload without one (``overfit`` overfits on purpose) says so, and the
entropy-floor invariant reports n/a for it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from numerics.cell.data import VOCAB, global_batch, markov_chain
from numerics.cell.label_mask import IGNORE, mask_labels, supervised_count
from numerics.cell.models import causal_lm_loss

Batch = dict[str, torch.Tensor]


class Workload:
    """Defaults: the model's own loss, no response mask, no known entropy."""

    name = ""

    def step_batch(self, spec: Any, step: int) -> Batch:
        raise NotImplementedError

    def batch_of(self, spec: Any, sample_ids: Sequence[int]) -> Batch:
        """The stream's samples ``sample_ids`` as one batch, sample ``i`` of step ``s`` being id
        ``s * global_batch + i``: what a Trainer's own sampler put in one step, for the reference."""
        size = spec.global_batch
        steps = {step: self.step_batch(spec, step) for step in sorted({i // size for i in sample_ids})}
        keys = next(iter(steps.values()))
        return {key: torch.stack([steps[i // size][key][i % size] for i in sample_ids]) for key in keys}

    def loss(self, output: Any, micro: Batch, spec: Any) -> torch.Tensor:
        return output.loss

    def supervised_tokens(self, batch: Batch) -> int:
        return supervised_count(batch["labels"])

    def response_mask(self, spec: Any, step: int) -> torch.Tensor | None:
        """The positions the step's labels should supervise; None where every token is a target."""
        return None

    def oracle_loss(self, batch: Batch) -> float | None:
        return None

    def entropy_rate(self) -> float | None:
        return None

    def entropy_floor(self, spec: Any, sigmas: float) -> float | None:
        """The lowest loss a correct model can show on a step: the entropy rate less ``sigmas``
        standard errors of the step's mean surprisal (the judge's margin,
        ``THRESHOLDS.entropy_floor_sigmas``); None without a known entropy rate."""
        return None


def surprisal(input_ids: torch.Tensor) -> np.ndarray:
    """-ln P(next | current) under the true chain, for every target position."""
    src, dst = input_ids[:, :-1].numpy(), input_ids[:, 1:].numpy()
    return -np.log(markov_chain().transition[src, dst])


class MarkovStream(Workload):
    """Fresh Markov-chain sequences every step; labels are the inputs (HF shifts them)."""

    name = "markov"

    def step_batch(self, spec: Any, step: int) -> Batch:
        ids = global_batch(spec.seq_len, spec.seed, step, spec.global_batch)
        return {"input_ids": ids, "labels": ids}

    def oracle_loss(self, batch: Batch) -> float | None:
        """Mean surprisal of the batch's next tokens under the true chain."""
        return float(surprisal(batch["input_ids"]).mean())

    def entropy_rate(self) -> float | None:
        return markov_chain().entropy_rate

    def entropy_floor(self, spec: Any, sigmas: float) -> float | None:
        return markov_chain().floor(spec.global_batch * (spec.seq_len - 1), sigmas)


# Special tokens of the ``overfit`` and ``padded`` workloads. ``padded`` draws its
# content from the whole Markov vocabulary: its PAD is only ever masked input.
PAD, BOS, EOS, SEP = 0, 1, 2, 3
TAGS = (4, 5)  # a per-sample special token (task or source tag), masked like every special
FIRST_CONTENT = 6
PROMPT_LENS, RESPONSE_LEN = (4, 3), 5  # unequal prompts: the second sample is right-padded


class OverfitPair(Workload):
    """The same two prompt/response samples every step (in a fixed order, repeated to the global
    batch): a correct loop memorises them, so a loss that floors above zero is a bug (incident 3).

    Only the response is supervised, and both samples supervise RESPONSE_LEN tokens, so the
    per-micro-batch mean is the global mean. Fault ``label_mask_leak`` also supervises the
    tag: its prefix (BOS) is the same in both samples, so the best a model can do on it is
    ln 2, and the loss floors at `leak_floor` however long it trains.
    """

    name = "overfit"

    def samples(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two samples as (input_ids, response mask), right-padded with PAD."""
        rng = np.random.default_rng([seed, 3])
        width = 3 + max(PROMPT_LENS) + RESPONSE_LEN + 1
        ids, mask = torch.full((2, width), PAD), torch.zeros((2, width), dtype=torch.bool)
        for i, prompt_len in enumerate(PROMPT_LENS):
            prompt, response = rng.integers(FIRST_CONTENT, VOCAB, prompt_len), rng.integers(FIRST_CONTENT, VOCAB, RESPONSE_LEN)
            row = [BOS, TAGS[i], *prompt, SEP, *response, EOS]
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, len(row) - 1 - RESPONSE_LEN:len(row) - 1] = True
        return ids, mask

    def _repeat(self, spec: Any, pair: torch.Tensor) -> torch.Tensor:
        return pair[torch.arange(spec.global_batch) % 2]

    def response_mask(self, spec: Any, step: int) -> torch.Tensor:
        return self._repeat(spec, self.samples(spec.seed)[1])

    def step_batch(self, spec: Any, step: int) -> Batch:
        ids, mask = (self._repeat(spec, t) for t in self.samples(spec.seed))
        if spec.fault == "label_mask_leak":
            mask = mask | (ids == TAGS[0]) | (ids == TAGS[1])
        return {"input_ids": ids, "labels": mask_labels(ids, mask), "attention_mask": (ids != PAD).long()}

    @staticmethod
    def leak_floor(global_batch: int) -> float:
        """Lowest mean loss with the tag supervised: the entropy of which tag follows BOS,
        once per sample, over RESPONSE_LEN + 1 targets per sample."""
        p = math.ceil(global_batch / 2) / global_batch
        tag_entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if p < 1 else 0.0
        return tag_entropy / (RESPONSE_LEN + 1)


MIN_LEN = 4  # shortest padded sequence: three targets


class PaddedStream(MarkovStream):
    """Markov sequences of per-sample length, right-padded: micro-batches hold different numbers
    of targets, so the loss must be normalised by the step's global target count (incident 6).

    Per micro-batch the loss is (sum of its token losses) / (global targets) * GA * world size:
    DeepSpeed divides by GA and averages over ranks, so the step's gradient is that of the mean
    over every target of the global batch, which is the reference's loss. Fault
    ``naive_token_mean`` returns the micro-batch's own mean (``outputs.loss``), what a plain loop
    does: it weights a target by 1 / (targets in its micro-batch).

    The global count cannot ride in the batch (the loop passes every key to the model), so
    `step_batch` keeps the count of the step it last built, and `loss` checks that the
    micro-batch is part of that step: the loop and the reference build a step's batch, then
    take its losses.
    """

    name = "padded"

    def __init__(self) -> None:
        self._step_rows: set[bytes] = set()
        self._step_targets = 0

    def lengths(self, spec: Any, step: int) -> torch.Tensor:
        """Per-sample lengths, each a pure function of (seed, step, index) like the samples."""
        return torch.tensor([int(np.random.default_rng([spec.seed, step, i, 1]).integers(min(MIN_LEN, spec.seq_len), spec.seq_len + 1))
                             for i in range(spec.global_batch)])

    def response_mask(self, spec: Any, step: int) -> torch.Tensor:
        return torch.arange(spec.seq_len)[None, :] < self.lengths(spec, step)[:, None]

    def step_batch(self, spec: Any, step: int) -> Batch:
        mask = self.response_mask(spec, step)
        ids = torch.where(mask, super().step_batch(spec, step)["input_ids"], PAD)
        return self._built({"input_ids": ids, "labels": mask_labels(ids, mask), "attention_mask": mask.long()})

    def batch_of(self, spec: Any, sample_ids: Sequence[int]) -> Batch:
        return self._built(super().batch_of(spec, sample_ids))

    def _built(self, batch: Batch) -> Batch:
        """``batch`` as the step whose micro-batch losses `loss` normalises next."""
        self._step_rows = {row.numpy().tobytes() for row in batch["input_ids"]}
        self._step_targets = self.supervised_tokens(batch)
        return batch

    def loss(self, output: Any, micro: Batch, spec: Any) -> torch.Tensor:
        if spec.fault == "naive_token_mean":
            return output.loss
        if not all(row.cpu().numpy().tobytes() in self._step_rows for row in micro["input_ids"]):
            raise RuntimeError("padded: loss() of a micro-batch that is not from the step step_batch() built last")
        token_sum = causal_lm_loss(output.logits, micro["labels"]) * supervised_count(micro["labels"])
        return token_sum * (spec.grad_accum * spec.world_size / self._step_targets)

    def oracle_loss(self, batch: Batch) -> float | None:
        return float(surprisal(batch["input_ids"])[batch["labels"][:, 1:].numpy() != IGNORE].mean())

    def entropy_floor(self, spec: Any, sigmas: float) -> float | None:
        """The floor for the fewest targets a step can hold: fewer tokens, wider noise."""
        return markov_chain().floor(spec.global_batch * (MIN_LEN - 1), sigmas)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [MarkovStream(), OverfitPair(), PaddedStream()]}


def get_workload(name: str) -> Workload:
    return WORKLOADS[name]


def slice_batch(batch: Batch, indices: range) -> Batch:
    return {key: value[list(indices)] for key, value in batch.items()}
