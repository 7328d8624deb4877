"""Numerics: distributed-training numerics checks for DeepSpeed and PEFT fine-tuning.

Subpackages by the stage a cell travels: ``cell`` (what a cell is), ``run`` (how it runs),
``judge`` (how it is judged), ``show`` (what the user sees), and ``versions`` (library
releases, which wraps them). Imports go cell <- judge <- run <- show (tests/test_layout.py).
"""
from numerics.cell.spec import RunSpec, SpecError
from numerics.judge.trace import StepRecord, Trace

__all__ = ["RunSpec", "SpecError", "StepRecord", "Trace"]
