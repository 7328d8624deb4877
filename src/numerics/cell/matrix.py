"""The matrix: axes, exclusions and families as data, and the cells they expand to.

The full product of every family's axes is ``--full`` (cover "full"). The default,
cover "triples", keeps every stage x dtype combination, puts every value of every other
axis beside each of them (a bug that needs one stage, one dtype and one value of a third
axis at once), and every pair of values of any two axes in at least one cell. Cover
"pairs" drops the triples: the smallest set in which every pair still meets.
"""
from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field
from typing import Any

from numerics.cell.faults import BF16_MARGINAL, FAULTS, Fault
from numerics.cell.invariant_sets import LORA_INVARIANTS, OVERFIT_INVARIANTS, TRAINER_INVARIANTS
from numerics.cell.spec import TRAINER_LOSSES, RunSpec

STAGES = [0, 1, 2, 3]
DTYPES = ["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Family:
    name: str
    axes: dict[str, list[Any]]
    base: dict[str, Any] = field(default_factory=dict)
    kept: tuple[str, ...] = ("zero_stage", "dtype")  # axes whose full product the covering subset keeps


# Shared bases of the cells that have a second-driver twin.
OVERFIT = {"workload": "overfit", "world_size": 2, "micro_batch": 1, "steps": 60, "lr": 5e-3, "invariants": OVERFIT_INVARIANTS}
PADDED = {"workload": "padded", "world_size": 2, "micro_batch": 4}
EPOCHS = {**FAULTS["optimizer_reset_at_epoch"].cell, "world_size": 2}
CLIPPED = {**FAULTS["clip_ignored"].cell, "micro_batch": 4}  # fixed_batch halves it for GA 2: the fault's cell

FAMILIES = [
    Family(
        "comm",
        axes={"zero_stage": STAGES, "dtype": DTYPES, "comm_dtype": [None, "fp32", "fp16", "bf16"]},
        base={"world_size": 2},
    ),
    Family(
        # HF-style outputs, accumulation at the same global batch (8): micro-batch 4 x GA 1 x 2 ranks,
        # 1 x 4 x 2; SGD beside AdamW, which normalises a gradient scale away.
        "accum",
        axes={"zero_stage": STAGES, "dtype": DTYPES, "grad_accum": [1, 4],
              "optimizer": ["adamw", "sgd"], "optimizer_source": ["config", "client"]},
        base={"world_size": 2, "micro_batch": 4},
    ),
    Family(
        # Reduction order only differs with more ranks; oversubscribed on 2 cores is fine at this size.
        "ws4",
        axes={"zero_stage": STAGES, "dtype": ["fp32", "bf16"]},
        base={"world_size": 4, "micro_batch": 2},
    ),
    Family(
        # DeepSpeed's own bucket defaults: the whole tiny model in one bucket, as most toy tests run.
        "default_buckets",
        axes={"zero_stage": [1, 2, 3], "dtype": ["bf16"]},
        base={"world_size": 2, "buckets": "default"},
    ),
    Family(
        # LoRA through deepspeed.initialize; the base dtype matters where DeepSpeed precision is off.
        "lora",
        axes={"zero_stage": STAGES, "dtype": DTYPES, "base_dtype": DTYPES},
        base={"world_size": 2, "lora": True, "invariants": LORA_INVARIANTS},
    ),
    # Gradient clipping that bites. Each optimizer wrapper clips on its own path (ZeRO-0 fp32, bf16
    # and fp16, ZeRO-1/2, ZeRO-3), fp16 through its loss scale, every one after accumulation; the
    # Trainer hands its max_grad_norm to DeepSpeed. Every other cell's bound never bites.
    Family("clip", axes={"zero_stage": STAGES, "dtype": DTYPES}, base=CLIPPED),
    Family("trainer_clip", axes={"zero_stage": [0, 3], "dtype": ["bf16"]},
           base={**CLIPPED, "driver": "trainer", "invariants": TRAINER_INVARIANTS}),
    # Incident 3: a correct loop memorises two prompt/response samples (prompt and specials masked).
    Family("overfit", axes={"zero_stage": STAGES, "dtype": ["fp32"]}, base=OVERFIT),
    # Incident 6: variable-length padded sequences, loss normalised over the global batch's tokens.
    Family("padded", axes={"zero_stage": STAGES, "dtype": ["fp32", "bf16"], "grad_accum": [1, 4]}, base=PADDED),
    Family(
        # Incident 5: checkpoint mid-run, resume in a fresh engine, bit-exact against the run uninterrupted.
        "resume",
        axes={"zero_stage": STAGES, "dtype": DTYPES, "lora": [False, True]},
        base={**FAULTS["resume_without_optimizer_state"].cell, "world_size": 2},
    ),
    # Incident 4: several epochs over a finite dataset with a warm-up/decay schedule and evals.
    Family("epochs", axes={"zero_stage": [0, 3], "dtype": ["fp32", "bf16"]}, base=EPOCHS),
    # The transformers Trainer path, its stock loss (token counting, sampler, sharding) and a custom
    # compute_loss, with accumulation where releases differ most. Config optimizer only: the
    # Trainer's own AdamW exempts biases and norms from weight decay, which the reference does not.
    Family("trainer", axes={"zero_stage": STAGES, "dtype": DTYPES, "grad_accum": [1, 2, 4], "trainer_loss": list(TRAINER_LOSSES)},
           base={"world_size": 2, "driver": "trainer", "invariants": TRAINER_INVARIANTS}),
    # Incidents 3, 6 and 4 under the Trainer: its loss scaling under GA, accelerate's backward and
    # its own eval loop must keep the same numbers, and its logs must show them. Overfitting keeps
    # the two samples in every step (custom loss, in order; the incident is the label mask, which
    # both losses read): the stock random sampler deals steps of one sample twice from that stream,
    # which memorises slower than the threshold was measured at (0.061 after 60 steps vs < 0.05).
    Family("trainer_overfit", axes={"zero_stage": [0, 2], "dtype": ["fp32"]},
           base={**OVERFIT, "driver": "trainer", "trainer_loss": "custom", "invariants": OVERFIT_INVARIANTS + ("logged_matches",)}),
    Family("trainer_padded", axes={"zero_stage": [0, 3], "dtype": ["fp32", "bf16"], "grad_accum": [1, 4], "trainer_loss": list(TRAINER_LOSSES)},
           base={**PADDED, "driver": "trainer", "invariants": TRAINER_INVARIANTS}),
    Family("trainer_epochs", axes={"zero_stage": [0, 3], "dtype": ["fp32"]},
           base={**EPOCHS, "driver": "trainer_epochs", "invariants": EPOCHS["invariants"] + ("logged_matches",)}),
]

# Cells no sane user runs, or that cannot run, with the reason; a tuple means any of its values.
EXCLUSIONS: list[tuple[dict[str, Any], str]] = [
    ({"lora": True, "dtype": ("bf16", "fp16"), "base_dtype": ("bf16", "fp16")},
     "DeepSpeed bf16/fp16 casts the whole model: the base dtype does not matter"),
]


def fixed_batch(cell: dict[str, Any]) -> dict[str, Any]:
    """Keep the global batch fixed when GA varies: micro-batch shrinks by the accumulation factor."""
    if cell.get("grad_accum", 1) > 1:
        cell["micro_batch"] = max(1, cell.get("micro_batch", 4) // cell["grad_accum"])
    return cell


def _excluded(cell: dict[str, Any]) -> str | None:
    for pattern, reason in EXCLUSIONS:
        if all(cell.get(k) in v if isinstance(v, tuple) else cell.get(k) == v for k, v in pattern.items()):
            return reason
    return None


def full_product(family: Family) -> list[dict[str, Any]]:
    """Every combination of the family's axes that no exclusion removes."""
    names = list(family.axes)
    combos = [dict(zip(names, values)) for values in itertools.product(*family.axes.values())]
    return [axes for axes in combos if not _excluded({**family.base, **axes})]


def covering_subset(family: Family, triples: bool = True) -> list[dict[str, Any]]:
    """Greedy cover of every pair of values of two axes, and with ``triples`` of every value of
    every other axis beside each combination of ``family.kept``; each kept combination first."""
    names = list(family.axes)
    others = [n for n in names if n not in family.kept]
    if not others:
        return full_product(family)

    def covered(cell: dict[str, Any]) -> set[tuple]:
        found = {((a, cell[a]), (b, cell[b])) for a, b in itertools.combinations(names, 2)}
        if triples:
            kept = tuple((k, cell[k]) for k in family.kept)
            found |= {(kept, (a, cell[a])) for a in others}
        return found

    candidates = full_product(family)
    needed = set().union(*(covered(c) for c in candidates))
    chosen: list[dict[str, Any]] = []

    def take(options: list[dict[str, Any]]) -> None:
        best = max(options, key=lambda c: len(covered(c) & needed))
        chosen.append(best)
        needed.difference_update(covered(best))

    for kept in itertools.product(*(family.axes[k] for k in family.kept)):
        options = [c for c in candidates if all(c[k] == v for k, v in zip(family.kept, kept))]
        if options:
            take(options)
    while needed:
        take(candidates)
    return chosen


COVERS = ("pairs", "triples", "full")


def family_cells(family: Family, cover: str) -> list[dict[str, Any]]:
    if cover not in COVERS:
        raise ValueError(f"unknown cover {cover!r}; one of {COVERS}")
    return full_product(family) if cover == "full" else covering_subset(family, triples=cover == "triples")


def cells(cover: str = "triples", pattern: str | None = None) -> list[RunSpec]:
    """Every cell of the matrix at this cover (`COVERS`), optionally filtered by a glob on the cell id."""
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for family in FAMILIES:
        for axes in family_cells(family, cover):
            spec = RunSpec(**fixed_batch({**family.base, **axes}))
            if spec.cell_id in seen or (pattern and not fnmatch.fnmatch(spec.cell_id, pattern)):
                continue
            seen.add(spec.cell_id)
            specs.append(spec)
    return specs


# Every fault runs at each of these precisions: a check that catches a fault in fp32 may not in
# bf16, whose tolerances are ~1000x wider.
FAULT_PRECISIONS = ("fp32", "bf16")


def fault_precisions(fault: Fault) -> tuple[str, ...]:
    """The precisions a fault runs at: a rank that hangs, raises or dies is the runner's
    business, caught by ``completes`` whatever the dtype, so it runs once, in fp32; so does a
    fault whose bf16 effect sits inside the bf16 noise at some seeds (`faults.BF16_MARGINAL`)."""
    return FAULT_PRECISIONS[:1] if "completes" in fault.targets or fault.name in BF16_MARGINAL else FAULT_PRECISIONS


def fault_cell(fault: Fault, clean: bool = False, precision: str = "fp32") -> RunSpec:
    """The cell a fault runs in; its clean twin has no fault (and the default timeout).

    At ``precision="bf16"`` DeepSpeed runs bf16, or, for a LoRA fault whose cell loads its base
    in a low precision with DeepSpeed's off (the PEFT incident), the base is loaded in bf16."""
    cell = dict(fault.cell)
    if precision != "fp32":
        cell |= {"base_dtype": precision} if cell.get("base_dtype", "fp32") != "fp32" else {"dtype": precision}
    spec = RunSpec(**cell, fault=fault.name)
    return spec.with_(fault=None, timeout_s=RunSpec.timeout_s) if clean else spec


def named_cells(cover: str, pattern: str | None) -> list[RunSpec]:
    """`cells`, and when a glob is given, the clean twins of the faults it names too: the cell
    in which a real release reproduces a fault (peft 0.7.0's fp16 adapters are
    ``adapters_in_base_dtype``'s), so what `numerics bisect` reports can be run again."""
    specs = cells(cover, pattern)
    if pattern is None:
        return specs
    seen = {spec.cell_id for spec in specs}
    for fault in FAULTS.values():
        twin = fault_cell(fault, clean=True)
        if twin.cell_id not in seen and fnmatch.fnmatch(twin.cell_id, pattern):
            seen.add(twin.cell_id)
            specs.append(twin)
    return specs

