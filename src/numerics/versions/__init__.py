"""Library versions: isolated environments for any published release of deepspeed,
transformers, peft, accelerate (and torch where wheels exist), their resolution, the
lists of published releases, and the one compatibility module that lets the drivers
run on all of them.

Owns: building, caching and pruning environments (``environments``), resolving pins
to a complete installable set (``resolve``), release lists from the package index
(``releases``), constraints resolution cannot know (``constraints``), what a process
imports and from where (``probe``), running cells inside an environment (``cells``), the
version matrix (``combinations``), the first bad release (``bisect``), and feature
detection over library APIs (``compat``). It wraps the pipeline: it may import every stage
(`numerics.cell`, `judge`, `run`, and `show`'s report writers) to run cells in an
environment and report them, and only `numerics.show` (the CLI's ``env``, ``bisect`` and
``run --pin``, the plugin's version matrix) imports it. ``compat`` is the exception: it
imports nothing of numerics, and the drivers in `numerics.run` use it (tests/test_layout.py
checks both).
"""
