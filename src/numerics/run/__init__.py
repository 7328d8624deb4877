"""How a cell runs: the third stage of the pipeline.

Owns the persistent rank pools (``launcher``) and ranks an external launcher started
(``launched``), the per-rank platform setup (``platform``) and DeepSpeed's CPU ops
(``prepare``), the drivers a cell's ``driver`` names (``drivers`` maps it to ``train``:
the engine loop, ``trainer_driver``: the HF Trainer, ``continuity``: resume and epochs;
``lora`` wraps models in adapters), the plain-torch reference run (``reference``), and
``runner``, which turns a cell's outcome into verdicts with the judge (`CellResult`, its
``results.json`` record). May import `numerics.cell`, `numerics.judge` and
`numerics.versions.compat`; never `show` or the rest of `versions` (tests/test_layout.py
checks): who prints or writes reports passes its writer in.
"""
