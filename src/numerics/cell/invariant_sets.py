"""The names of the invariants, and the sets of them cells declare: data, not checks.

A cell names what it is held to (``RunSpec.invariants``); the checks behind the names live in
the judge (`numerics.judge.invariants`, which registers exactly these names and refuses
others). Keeping the names here lets the spec validate them, and the faults and the matrix
declare sets, without importing the judge.
"""
from __future__ import annotations

# Every invariant the judge defines (numerics.judge.invariants registers one check per name).
INVARIANT_NAMES = (
    "finite", "no_collapse", "no_spike", "learns", "parity_loss", "parity_grad_norm", "init_matches",
    "step0_grads", "grad_norm_agrees", "replicas_agree", "gathered_params_match",
    "adapter_dtype_policy", "frozen_base_unchanged", "adapters_learn", "merged_logits_match",
    "resume_matches", "epoch_continuity", "eval_present", "overfits", "supervised_tokens",
    "logged_matches", "memory_bounded", "engine_released",
)

# Held by every cell, whatever invariants it declares: memory is no numerics property a cell may
# opt out of, and a persistent rank carries what one cell leaks into every cell after it.
EVERY_CELL_INVARIANTS = ("memory_bounded", "engine_released")


def held_by(invariants: tuple[str, ...]) -> tuple[str, ...]:
    """What a cell that declares ``invariants`` is judged by: those, then every cell's own."""
    return invariants + tuple(name for name in EVERY_CELL_INVARIANTS if name not in invariants)


# The invariants a cell is held to unless it says otherwise.
DEFAULT_INVARIANTS = (
    "finite", "no_collapse", "no_spike", "learns", "init_matches", "step0_grads",
    "parity_loss", "parity_grad_norm", "grad_norm_agrees", "replicas_agree", "gathered_params_match",
)

# What a LoRA cell is held to: the core set plus the adapter invariants.
LORA_INVARIANTS = DEFAULT_INVARIANTS + ("adapter_dtype_policy", "frozen_base_unchanged", "adapters_learn", "merged_logits_match")

# An overfitting cell is not held to the entropy floor, spikes or the learning pace of a stream.
OVERFIT_INVARIANTS = ("finite", "overfits", "supervised_tokens", "init_matches", "step0_grads",
                      "parity_loss", "parity_grad_norm", "grad_norm_agrees", "replicas_agree", "gathered_params_match")

# A Trainer cell is also held to what it shows its user: every logged figure equals the measured one.
TRAINER_INVARIANTS = DEFAULT_INVARIANTS + ("logged_matches",)
