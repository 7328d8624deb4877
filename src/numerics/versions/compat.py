"""Feature detection over the APIs of the releases Numerics drives.

Argument names, return types and defaults changed across deepspeed 0.14 … today,
transformers 4.36 … today, peft 0.6 … today and accelerate. Every difference the
drivers meet is detected here, by looking at the API itself (a signature, an
attribute), never by comparing version numbers, so a release nobody has tried yet
works if it has the feature and says so if it does not.

A feature a cell needs and the installed release lacks raises `Unsupported`: the
cell's outcome is then "cannot run" with that reason, never a false fail or pass.
"""
from __future__ import annotations

import inspect
from typing import Any


class Unsupported(RuntimeError):
    """The installed release lacks an API the cell needs; the message says which and why."""


# -- deepspeed ------------------------------------------------------------------------
def full_fp32_params(params: list[Any]) -> list[Any]:
    """The full fp32 masters of ZeRO-3 trainable parameters, assembled from the ranks' partitions.

    DeepSpeed's ``safe_get_full_fp32_param`` all-gathers one parameter per call; a step's
    measurement would cost one collective per parameter (half a ZeRO-3 step on gloo). Where the
    release has the local accessor (``safe_get_local_fp32_param``), every rank's partitions go
    out in one all-gather and are cut up the way the full accessor cuts them: the same bits.
    Collective: every rank calls it with the same parameters in the same order.
    """
    from deepspeed import utils

    return _assembled(params, getattr(utils, "safe_get_local_fp32_param", None),
                      _required(utils, "safe_get_full_fp32_param", "ZeRO-3 parameters cannot be read "
                                "without gathering them mid-step"), "safe_get_full_fp32_param")


def own_fp32_partitions(params: list[Any]) -> list[Any]:
    """This rank's own slice of each ZeRO-3 trainable parameter's fp32 master, as its optimizer
    holds it (``safe_get_local_fp32_param``; not collective), flattened, without the padding that
    evens the partitions: rank r holds elements [r * size, (r + 1) * size) of the flattened
    parameter, ``size`` the partition's length."""
    import torch.distributed as dist
    from deepspeed import utils

    local = _required(utils, "safe_get_local_fp32_param", "a rank's own ZeRO-3 partition cannot be read")
    rank, parts = dist.get_rank(), []
    for param in params:
        part = local(param).detach().reshape(-1)
        parts.append(part[:max(0, min(part.numel(), param.ds_numel - rank * part.numel()))].float().cpu().clone())
    return parts


def full_grads(params: list[Any]) -> list[Any]:
    """The full, reduced gradients of ZeRO-3 trainable parameters (``safe_get_full_grad``), in one
    all-gather of the local partitions (``safe_get_local_grad``) where the release has it. Collective."""
    from deepspeed import utils

    return _assembled(params, getattr(utils, "safe_get_local_grad", None), utils.safe_get_full_grad,
                      "safe_get_full_grad")


def coalesced_reductions(params: list[Any]) -> Any:
    """A context in which the all-reduce that DeepSpeed's ``safe_get_full_grad`` makes for each
    ZeRO-1/2 parameter is queued and issued as one collective on leaving it (torch's coalescing
    manager); the tensors the accessor returned are filled then. Without it, measuring the
    gradients costs one collective per parameter: 40 % of a ZeRO-2 step on gloo. A plain context
    where torch lacks the manager or the parameters do not share one data-parallel group."""
    import contextlib

    import torch.distributed as dist

    manager = getattr(dist, "_coalescing_manager", None)
    groups = {id(group): group for group in (getattr(p, "_dp_group", None) for p in params)}
    if manager is None or len(groups) != 1 or None in groups.values():
        return contextlib.nullcontext()
    return manager(group=next(iter(groups.values())))


def _required(module: Any, name: str, why: str) -> Any:
    accessor = getattr(module, name, None)
    if accessor is None:
        raise Unsupported(f"deepspeed {_deepspeed_version()}: no deepspeed.utils.{name}, so {why}")
    return accessor


def _assembled(params: list[Any], local: Any, full: Any, full_name: str) -> list[Any]:
    """Full tensors from each rank's ZeRO-3 partition, as DeepSpeed's full accessors build them
    (partitions of equal size in rank order, cut to ``ds_numel``); one collective for them all.
    Falls back to the full accessor per parameter where there is no local one."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    parts = [local(p) for p in params] if local is not None else None
    if parts is None or any(part is None or part.numel() * world < p.ds_numel for part, p in zip(parts, params)):
        return [_present(full(p), p, full_name) for p in params]
    flat = torch.cat([part.detach().reshape(-1).float() for part in parts])
    gathered = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(gathered, flat)
    by_rank = gathered.view(world, -1)
    tensors, offset = [], 0
    for part, param in zip(parts, params):
        tensors.append(by_rank[:, offset:offset + part.numel()].reshape(-1)[:param.ds_numel].view(param.ds_shape))
        offset += part.numel()
    return tensors


def _present(value: Any, param: Any, accessor: str) -> Any:
    if value is None:
        raise Unsupported(f"deepspeed {_deepspeed_version()}: {accessor} returned None for a "
                          f"trainable parameter of shape {tuple(getattr(param, 'ds_shape', param.shape))}")
    return value


def partitioned_params(params: list[Any]) -> list[Any]:
    """CPU copies of ZeRO-3 ``params`` in full and in their own dtype, assembled from every rank's
    partition (``ds_tensor``, which the forward gathers) by one all-gather that is waited for: what
    ``GatheredParameters`` shows, without its gloo race before 0.19.8 (unfilled buffers read at
    random, `deviations.ZERO3_GLOO_GATHER`). For measurements that check something else (LoRA's
    frozen base, its merge), so that race shows in ``gathered_params_match`` alone. fp16 and bf16
    travel as fp32 and come back bit for bit. Collective."""
    if any(getattr(p, "ds_tensor", None) is None for p in params):
        raise Unsupported(f"deepspeed {_deepspeed_version()}: a ZeRO-3 parameter without ds_tensor, its partition")
    full = _assembled(params, lambda p: p.ds_tensor, None, "ds_tensor")
    return [t.to(p.ds_tensor.dtype).cpu().clone() for t, p in zip(full, params)]


def gathered_params(params: list[Any]) -> list[Any]:
    """CPU copies of ``params`` as ``deepspeed.zero.GatheredParameters`` shows them: the view a
    forward pass, a user's logging or a 16-bit save reads under ZeRO-3. Collective."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().cpu().clone() for p in params]


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


# -- transformers / accelerate ----------------------------------------------------------

# TrainingArguments renamed across releases: today's name -> the name older releases take.
# eval_strategy was evaluation_strategy before 4.41; use_cpu was no_cuda before 4.34.
TRAINING_ARGUMENT_RENAMES = {"eval_strategy": "evaluation_strategy", "use_cpu": "no_cuda"}


def training_arguments(**arguments: Any) -> Any:
    """``transformers.TrainingArguments(**arguments)`` with today's argument names spelled as the
    installed release takes them; one it takes under neither name raises `Unsupported`."""
    import transformers

    accepted = set(inspect.signature(transformers.TrainingArguments).parameters)
    spelled = {}
    for name, value in arguments.items():
        older = TRAINING_ARGUMENT_RENAMES.get(name)
        if name not in accepted and older not in accepted:
            raise Unsupported(f"transformers {transformers.__version__}: TrainingArguments takes no {name!r}"
                              + (f" nor {older!r}" if older else ""))
        spelled[name if name in accepted else older] = value
    return transformers.TrainingArguments(**spelled)


def trainer_engine(trainer: Any) -> Any:
    """The DeepSpeed engine a Trainer built (``trainer.deepspeed``, set once training starts):
    the driver measures around its ``step``; a Trainer that exposes none cannot be measured."""
    engine = getattr(trainer, "deepspeed", None)
    if engine is None or not hasattr(engine, "is_gradient_accumulation_boundary"):
        import accelerate
        import transformers

        raise Unsupported(f"transformers {transformers.__version__} with accelerate {accelerate.__version__}: the "
                          f"Trainer built {type(engine).__name__}, not a DeepSpeed engine (accelerate before 1.0 "
                          "enables DeepSpeed only off CPU), so its optimizer steps cannot be measured")
    return engine


# -- peft -------------------------------------------------------------------------------
