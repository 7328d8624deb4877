"""What the user sees: the last stage of the pipeline.

Owns the command line (``cli``), the pytest plugin (``plugin``), ``results.json`` on disk
(``results``), the terminal table, junit.xml and merged reports (``report``), report.html and
its curves (``report_page``, ``curves``), the fault self-test (``selftest``) and
cost-balanced shards (``shard``, from the measured ``costs.json``) and running them at once
(``jobs``). May import every earlier
layer (`numerics.cell`, `judge`, `run`) and `numerics.versions` (the CLI's ``env``,
``bisect`` and ``run --pin``, the plugin's version matrix); nothing earlier imports it
(tests/test_layout.py checks).
"""
