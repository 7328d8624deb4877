"""How a cell is judged: the second stage of the pipeline.

Owns the trace a run records (``trace``: `Trace`, `StepRecord`), the invariants over traces
and their verdicts (``invariants``, registered under the names `numerics.cell.invariant_sets`
lists), the thresholds and tolerances (``thresholds``), the known-deviations table
(``deviations``), the inapplicable-invariant table (``expected_na``) and golden traces
(``golden``). Pure functions over traces and specs: nothing here trains. May import
`numerics.cell`; never `run`, `show` or `versions` (tests/test_layout.py checks).
"""
