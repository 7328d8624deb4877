"""Numerics: distributed-training numerics checks for DeepSpeed and PEFT fine-tuning."""
from numerics.spec import RunSpec, SpecError
from numerics.trace import StepRecord, Trace

__all__ = ["RunSpec", "SpecError", "StepRecord", "Trace"]
