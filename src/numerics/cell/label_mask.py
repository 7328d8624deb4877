"""Label masks for supervised fine-tuning: build them, and check a user's batch against one.

Why: a label mask that supervises a token the model cannot predict (a prompt
token, a per-sample special token) does not crash anything; the loss just
floors above zero and a two-sample overfit never gets there (incident 3). A
mask that drops response tokens trains on less than the user thinks. Both show
in the batch before any training, so check the batch.

Convention (Hugging Face causal LMs): ``labels`` has the shape of ``input_ids``
and the model shifts it: a supervised position ``t`` carries ``labels[t] ==
input_ids[t]``, and position 0 is never a target, whatever its label.
"""
from __future__ import annotations

import torch

IGNORE = -100  # the ignore_index of torch's and Hugging Face's cross-entropy


def mask_labels(input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Labels that supervise exactly the response positions."""
    return torch.where(response_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE))


def supervised_count(labels: torch.Tensor) -> int:
    """Targets the loss averages over: supervised positions after the shift (position 0 never is)."""
    return int((labels[:, 1:] != IGNORE).sum())


def _first(where: torch.Tensor, input_ids: torch.Tensor) -> str:
    row, col = (int(i) for i in where.nonzero()[0])
    return f"first at sample {row}, position {col} (token {int(input_ids[row, col])})"


def check_label_mask(batch: dict[str, torch.Tensor], response_mask: torch.Tensor) -> list[str]:
    """Problems with ``batch["labels"]`` against the positions that should be supervised; [] if none.

    ``response_mask`` is True on response tokens only: not on the prompt, not on
    special tokens (BOS, SEP, EOS, role or task tags), not on padding.
    """
    input_ids, labels, mask = batch["input_ids"], batch["labels"], response_mask.bool()
    if not labels.shape == input_ids.shape == mask.shape:
        return [f"shapes differ: input_ids {tuple(input_ids.shape)}, labels {tuple(labels.shape)}, "
                f"response mask {tuple(mask.shape)}"]
    problems = []
    if "attention_mask" in batch and (padded := mask & (batch["attention_mask"] == 0)).any():
        problems.append(f"the response mask covers {int(padded.sum())} padding positions, {_first(padded, input_ids)}")
    if (wrong := mask & (labels != input_ids)).any():
        problems.append(f"{int(wrong.sum())} response positions are not supervised with their own token, {_first(wrong, input_ids)}")
    if (leaked := ~mask & (labels != IGNORE)).any():
        problems.append(f"{int(leaked.sum())} positions outside the response are supervised, {_first(leaked, input_ids)}")
    expected = int(mask[:, 1:].sum())
    if supervised_count(labels) != expected:
        problems.append(f"{supervised_count(labels)} supervised targets, the response mask says {expected}")
    return problems
