"""LoRA cells: wrap the tiny model with PEFT adapters and record what adapter bugs change.

Most fine-tuning incidents live here: adapters created in the base dtype and
stepped by pure-fp16 Adam, frozen weights that move, adapters that never leave
zero, merges that change the logits. The measurements go into ``trace.meta``
for the adapter invariants in invariants.py.
"""
from __future__ import annotations

from typing import Any

import torch

from numerics.cell.models import build_model, tensor_checksum
from numerics.cell.spec import RunSpec
from numerics.versions import compat

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The head is adapted too: on a randomly initialised base the logits are nearly flat, and
# adapters on attention/MLP alone move them too little to learn within a short cell.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
LORA_RANK, LORA_ALPHA = 8, 16
ADAPTER_SEED_OFFSET = 1  # adapters draw from their own seed, so the base init is the same with or without LoRA


def apply_lora(model: torch.nn.Module, spec: RunSpec, options: dict[str, Any]) -> torch.nn.Module:
    """The base model in ``spec.base_dtype``, wrapped with LoRA on attention, MLP and head projections."""
    from peft import LoraConfig, get_peft_model

    model.to(TORCH_DTYPES[spec.base_dtype])
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    torch.manual_seed(spec.seed + ADAPTER_SEED_OFFSET)
    return get_peft_model(model, config, **options)


def stepped_tensors(engine: Any) -> list[torch.Tensor]:
    """The tensors the optimizer actually steps: DeepSpeed's fp32 master partitions where it keeps
    them, else the model's own parameters."""
    optimizer = engine.basic_optimizer or engine.optimizer
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    return tensors or list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))  # ZeRO-3 keeps them here


def optimizer_state_dtypes(engine: Any) -> list[str]:
    optimizer = engine.basic_optimizer or engine.optimizer
    return sorted({str(v.dtype) for state in optimizer.state.values() for v in state.values()
                   if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1})


def dtypes(tensors: list[torch.Tensor]) -> list[str]:
    return sorted({str(t.dtype) for t in tensors})


def named_full_params(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter in full, in its training dtype, on CPU (assembled from the ranks' partitions
    under ZeRO-3, not through ``GatheredParameters``, whose own bugs `gathered_params_match`
    checks; collective)."""
    named = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        return dict(zip((n for n, _ in named), compat.partitioned_params([p for _, p in named])))
    return {n: p.detach().cpu().clone() for n, p in named}


def frozen_checksum(params: dict[str, torch.Tensor], engine: Any) -> str:
    frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
    return tensor_checksum([t for n, t in params.items() if n in frozen])


def merge_logits_error(spec: RunSpec, params: dict[str, torch.Tensor], batch: torch.Tensor) -> float:
    """max |logits(merged) - logits(unmerged)| / max |logits(unmerged)|, in the trained dtype."""
    model = apply_lora(build_model(spec.model, spec.seed), spec, {})
    model.load_state_dict(params, strict=True, assign=True)  # assign keeps each tensor's trained dtype
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=batch).logits.float()
        merged = model.merge_and_unload()(input_ids=batch).logits.float()
    return float((merged - unmerged).abs().max() / unmerged.abs().max().clamp_min(1e-30))


def record_start(engine: Any, meta: dict[str, Any]) -> None:
    """Adapter facts right after ``deepspeed.initialize``."""
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    frozen = [p for p in engine.module.parameters() if not p.requires_grad]
    meta.update(
        trainable_dtypes=dtypes(trainable), frozen_dtypes=dtypes(frozen),
        stepped_dtypes=dtypes(stepped_tensors(engine)), optimizer=type(engine.basic_optimizer or engine.optimizer).__name__,
        frozen_checksum_start=frozen_checksum(named_full_params(engine), engine),
    )


def record_end(engine: Any, spec: RunSpec, meta: dict[str, Any], batch: torch.Tensor) -> None:
    """Adapter facts after training: frozen weights, LoRA B, optimizer state, merge."""
    params = named_full_params(engine)
    meta.update(
        optimizer_state_dtypes=optimizer_state_dtypes(engine),
        frozen_checksum_end=frozen_checksum(params, engine),
        lora_b_still_zero=[n for n, t in params.items() if "lora_B" in n and not t.any()],
        merge_logits_rel_error=merge_logits_error(spec, params, batch),
    )
