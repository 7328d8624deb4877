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
def full_fp32_param(param: Any) -> Any:
    """The full fp32 master of a trainable parameter (``deepspeed.utils.safe_get_full_fp32_param``),
    assembled from the ranks' partitions under ZeRO-3; collective there."""
    from deepspeed import utils

    accessor = getattr(utils, "safe_get_full_fp32_param", None)
    if accessor is None:
        raise Unsupported(f"deepspeed {_deepspeed_version()}: no deepspeed.utils.safe_get_full_fp32_param, "
                          "so ZeRO-3 parameters cannot be read without gathering them mid-step")
    value = accessor(param)
    if value is None:
        raise Unsupported(f"deepspeed {_deepspeed_version()}: safe_get_full_fp32_param returned None for a "
                          f"trainable parameter of shape {tuple(getattr(param, 'ds_shape', param.shape))}")
    return value


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
