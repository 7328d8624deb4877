"""Known deviations: failures of today's libraries that Numerics expects, with the reason.

Each entry is (cell pattern, invariant, package version range, reason, link);
the pattern is a dict of RunSpec fields the cell must have. A
matching failure is an expected failure; a matching pass is an *unexpected*
pass and fails the cell (strict xfail), so a fix upstream is noticed and the
entry removed, unless the entry is not ``strict``: a race that shows in some
runs only, or a bisected range of old releases whose fix is known and whose
invariants show in some of the pattern's cells only (SGD stops learning, Adam
does not). Any other failure in the same cell still turns it red.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from numerics.cell.spec import matches


@dataclass(frozen=True)
class Deviation:
    cell: dict[str, Any]  # RunSpec fields the cell must have, e.g. {"zero_stage": 0, "dtype": "fp16"}; a tuple means one of
    invariant: str
    versions: dict[str, str]  # package -> specifier set, e.g. {"deepspeed": ">=0.19,<0.20"}
    reason: str
    link: str = ""
    strict: bool = True  # False: a pass is not an unexpected pass (see the module docstring)
    found_by: str = ""  # the numerics bisect that measured the range, e.g. "first bad deepspeed==0.18.2"
    says: str = ""  # for a crash (``completes``): text its message must contain, so no other crash is excused

    def describe(self) -> str:
        """Which entry this is, as the report names it: its cells, releases and how they were found."""
        cells = ", ".join(f"{k}={v}" for k, v in self.cell.items())
        releases = ", ".join(f"{package} {specifier}" for package, specifier in self.versions.items())
        return f"known deviation {self.invariant} at {cells} on {releases}" + (f" ({self.found_by})" if self.found_by else "")

    def applies(self, spec: dict[str, Any], invariant: str, versions: dict[str, str | None], message: str = "") -> bool:
        if invariant != self.invariant or not matches(spec, self.cell):
            return False
        if self.says and self.says not in message:
            return False
        for package, specifier in self.versions.items():
            installed = versions.get(package)
            if installed is None or Version(installed).base_version not in SpecifierSet(specifier):
                return False
        return True


ZERO0_FP16 = (
    "ZeRO-0 fp16: engine.backward applies the loss scale only for ZeRO optimizers, yet FP16_Optimizer "
    "divides the gradients by it (4096) before stepping, so the update uses gradient/scale; the "
    "engine's reported norm is smaller by exactly the scale. Adam mostly normalises it away (eps "
    "still shifts the trajectory); SGD would barely move."
)
ZERO0_BF16 = (
    "ZeRO-0 bf16 with AdamW (FP16_Optimizer in bf16 mode) departs from ZeRO 1-3 bf16 by ~25x their "
    "spread from the fp32 reference (loss 5.4e-3 vs <= 2.3e-4 at step 15); ZeRO-0 bf16 with SGD "
    "stays inside. Cause not isolated yet."
)
ZERO3_GLOO_GATHER = (
    "ZeRO-3 on gloo: GatheredParameters (Init._allgather_params_coalesced) launches one all-gather "
    "per rank and waits only on the last handle; gloo's handles are independent and the CPU "
    "synchronize is a no-op, so at random one rank reads a buffer the gather has not filled yet "
    "(values up to 3e38, NaN at times) while training itself stays exact. Users see it in every "
    "mid-training read of full weights and in 16-bit saves. Fixed in 0.19.8 (every handle waited). "
    "Reproducer: repro/zero3_gathered_parameters.py --read step."
)
DS_019 = {"deepspeed": ">=0.19,<0.20"}
# ZeRO-0 bf16 runs FP16_Optimizer in bf16 mode from 0.17.6 (BF16_Optimizer before, see
# ZERO0_BF16_ACCESSOR): the loss drift shows on 0.17.6 and passes on 0.17.2, 0.17.4 and 0.17.5.
ZERO0_BF16_FP16_OPTIMIZER = {"deepspeed": ">=0.17.6,<0.20"}

TODAY: list[Deviation] = [
    *(Deviation({"zero_stage": 0, "dtype": "fp16", "fault": None}, name, DS_019, ZERO0_FP16)
      for name in ("step0_grads", "parity_grad_norm", "parity_loss")),
    Deviation({"zero_stage": 0, "dtype": "fp16", "optimizer_source": "client", "fault": None}, "grad_norm_agrees", DS_019,
              "ZeRO-0 fp16 with a client optimizer: the engine reports the true norm while the "
              "optimizer steps with gradient/scale (see the ZeRO-0 fp16 entries)."),
    # 16-step cells; the 8-step resume cells end before the drift crosses the tolerance.
    Deviation({"zero_stage": 0, "dtype": "bf16", "optimizer": "adamw", "fault": None, "driver": ("engine", "trainer")},
              "parity_loss", ZERO0_BF16_FP16_OPTIMIZER, ZERO0_BF16),
    # The drifted weights move the grad norm too, past the tolerance on some seeds only (LoRA seed 1:
    # 0.184 > 0.15 at step 8; seed 0 within), hence not strict.
    Deviation({"zero_stage": 0, "dtype": "bf16", "optimizer": "adamw", "fault": None, "driver": ("engine", "trainer")},
              "parity_grad_norm", ZERO0_BF16_FP16_OPTIMIZER, ZERO0_BF16, strict=False),
    Deviation({"zero_stage": 0, "dtype": ("bf16", "fp16"), "driver": "resume", "fault": None}, "resume_matches", DS_019,
              "ZeRO-0 bf16/fp16 (FP16_Optimizer): after load_checkpoint the parameters differ from the "
              "uninterrupted run's from the first resumed update on, while loss and grad norm at the "
              "resume step are bit-equal; ZeRO 1-3 resume bit-exactly. Suspected: the fp32 master "
              "weights are rebuilt from the low-precision module weights instead of restored."),
    Deviation({"zero_stage": 3, "fault": None}, "gathered_params_match", {"deepspeed": "<0.19.8"}, ZERO3_GLOO_GATHER,
              strict=False, found_by="repro/zero3_gathered_parameters.py: present 0.17.6-0.19.7, none on 0.19.8"),
]

# Regressions of older releases that the compatibility sweep (benchmarks/sweep.py) found, each
# range bisected with numerics bisect (found_by). Closed ranges: their fix is known, and which
# invariants show depends on the cell (SGD stops learning, Adam does not), so not strict.
ZERO0_BF16_ACCESSOR = (
    "ZeRO-0 bf16 before 0.17.6 (BF16_Optimizer): deepspeed.utils.safe_get_full_grad returns this rank's "
    "bf16 gradient before the all-reduce, not the reduced fp32 one: what a user (and Numerics) reads "
    "is wrong (relative L2 1.09; norm 1.28 vs 1.05) while the engine's own norm (1.04863) and training "
    "match the reference."
)
ZERO1_GA_SCALE = (
    "ZeRO-1 with gradient accumulation from 0.18.3: the gradient the optimizer steps, and the norm the "
    "engine reports and clips by, is the true one divided by GA once more (1/4 at GA 4 through "
    "engine.backward/step; 1/GA^2 under the HF Trainer, which calls engine.step every micro-batch). Adam "
    "hides the scale, SGD stops learning. 0.18.3 changed how the ZeRO-1/2 epilogue accumulates "
    "micro-batches (all_grad_tensors instead of averaged_gradients)."
)
ZERO2_BF16_GA = (
    "ZeRO-2 bf16 with gradient accumulation: the stepped gradient is 93% off the true one (relative L2) "
    "with 0.42x its norm, as if micro-batches were lost; SGD stops learning, AdamW's loss is 0.4% off "
    "at step 1."
)
SPLIT_VIEW = (
    "ZeRO-1/2 on torch 2.13: the first step's all-gather of the updated partitions writes into a view "
    "returned by torch.split and raises 'Output 0 of Split is a view and is being modified inplace': "
    "no ZeRO-1/2 run gets past step 0."
)
TOKEN_COUNT = (
    "HF Trainer, stock loss: num_items_in_batch counts labels before the causal shift (one token per "
    "sequence more than the loss averages), so the loss it backpropagates and logs is the token mean "
    "x (L-1)/L: gradients and logged loss 3.1% low at sequence length 32; with padding the factor "
    "differs per batch, and the loss drifts too (1.1e-3 at step 1)."
)
GA_TWICE = (
    "HF Trainer, GA > 1: the loss is divided by GA by the Trainer and again by DeepSpeed's backward, "
    "so gradients are 1/GA of the truth (stock loss: 0.24 = 1/4 x 31/32 at GA 4; a user's own "
    "compute_loss: 0.25). Adam hides the scale."
)
LOGGED_TIMES_GA = (
    "HF Trainer, a user's own compute_loss, GA > 1: the logged loss is the true loss x GA (16.4 for "
    "4.11 at GA 4); training is right."
)
TRAINER_CUSTOM_GA = {"driver": "trainer", "trainer_loss": "custom", "grad_accum": (2, 4), "fault": None}
NO_SYNC_STEP = (
    "HF Trainer with DeepSpeed (4.46.2 at GA 1, 4.47.0 at GA 4): engine.step() is called inside "
    "accelerate's no_sync context and DeepSpeed asserts ('It is illegal to call Engine.step() inside "
    "no_sync context manager'): no run gets past its first step."
)
TRAINER_STOCK = {"driver": ("trainer", "trainer_epochs"), "trainer_loss": "stock", "fault": None}

FINDINGS: list[Deviation] = [
    *(Deviation({"zero_stage": 0, "dtype": "bf16", "fault": None}, name, {"deepspeed": "<0.17.6"}, ZERO0_BF16_ACCESSOR,
                strict=False, found_by="first fixed deepspeed==0.17.6, last bad 0.17.5 (numerics run --pin on "
                "0.16.9, 0.17.2, 0.17.4, 0.17.5, 0.17.6; the bisect skips 0.17.6, which fails parity_loss too)")
      for name in ("step0_grads", "parity_grad_norm", "grad_norm_agrees")),
    *(Deviation({"zero_stage": 1, "grad_accum": (2, 4), "fault": None}, name, {"deepspeed": ">=0.18.3,<0.19.6"},
                ZERO1_GA_SCALE, strict=False,
                found_by="first bad deepspeed==0.18.3 (last good 0.18.2); first fixed 0.19.6 (last bad 0.19.5)")
      for name in ("step0_grads", "parity_grad_norm", "parity_loss", "learns")),
    *(Deviation({"zero_stage": 2, "dtype": "bf16", "grad_accum": (2, 4), "fault": None}, name,
                {"deepspeed": ">=0.17.6,<0.18.4"}, ZERO2_BF16_GA, strict=False,
                found_by="first bad deepspeed==0.17.6 (last good 0.17.5); first fixed 0.18.4 (last bad 0.18.3)")
      for name in ("step0_grads", "parity_grad_norm", "parity_loss", "learns")),
    Deviation({"zero_stage": (1, 2), "fault": None}, "completes", {"deepspeed": ">=0.18.7,<0.19.0"}, SPLIT_VIEW,
              strict=False, says="Output 0 of Split is a view",
              found_by="first bad deepspeed==0.18.7 (0.18.6 completes); first fixed 0.19.0 (last bad 0.18.9)"),
    *(Deviation(TRAINER_STOCK, name, {"transformers": ">=4.46.2,<5.10.1"}, TOKEN_COUNT, strict=False,
                found_by="first fixed transformers==5.10.1, last bad 5.9.0; first bad 4.46.2 (GA 4), 4.46.1 good")
      for name in ("step0_grads", "parity_grad_norm", "logged_matches", "parity_loss")),
    *(Deviation({**TRAINER_STOCK, "grad_accum": (2, 4)}, name, {"transformers": ">=4.46.2,<4.49.0"}, GA_TWICE,
                strict=False, found_by="first bad transformers==4.46.2, last good 4.46.1; 4.48.3 bad, 4.49.0 good")
      for name in ("step0_grads", "parity_grad_norm")),
    Deviation(TRAINER_CUSTOM_GA, "logged_matches", {"transformers": ">=4.47.0,<4.48.0"}, LOGGED_TIMES_GA, strict=False,
              found_by="first bad transformers==4.47.1 (4.47.0 crashes), last good 4.46.3; 4.48.0 logs right"),
    *(Deviation(TRAINER_CUSTOM_GA, name, {"transformers": ">=4.48.0,<4.49.0"}, GA_TWICE, strict=False,
                found_by="4.48.0-4.48.3 (skipped by the logged_matches bisect for this); 4.47.1 and 4.49.0 not")
      for name in ("step0_grads", "parity_grad_norm")),
    Deviation({"driver": "trainer", "fault": None}, "completes", {"transformers": ">=4.46.2,<4.47.1,!=4.46.3"},
              NO_SYNC_STEP, strict=False, says="inside no_sync",
              found_by="4.46.2 at GA 1 and 4.47.0 at GA 4 crash; 4.46.1, 4.46.3 and 4.47.1 complete (bisect skips them)"),
]

KNOWN_DEVIATIONS: list[Deviation] = [*TODAY, *FINDINGS]


def find(spec: dict[str, Any], invariant: str, versions: dict[str, str | None], message: str = "") -> Deviation | None:
    return next((d for d in KNOWN_DEVIATIONS if d.applies(spec, invariant, versions, message)), None)


def apply(verdicts: list[Any], spec: dict[str, Any], versions: dict[str, str | None]) -> None:
    """Turn, in place, each verdict a known deviation covers: a failure into ``xfail``, a pass
    into ``xpass`` (the deviation no longer reproduces) unless the deviation is not strict."""
    for verdict in verdicts:
        known = find(spec, verdict.invariant, versions, verdict.message)
        if known is None:
            continue
        verdict.reason = f"{known.reason} {known.link} [{known.describe()}]".replace("  ", " ")
        if verdict.status == "fail":
            verdict.status = "xfail"
        elif verdict.status == "pass" and known.strict:
            verdict.status, verdict.message = "xpass", f"known deviation no longer reproduces: {verdict.reason}"
