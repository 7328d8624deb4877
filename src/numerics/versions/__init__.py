"""Library versions: isolated environments for any published release of deepspeed,
transformers, peft, accelerate (and torch where wheels exist), their resolution, the
lists of published releases, and the one compatibility module that lets the drivers
run on all of them.

Owns: building, caching and pruning environments (``environments``), resolving pins
to a complete installable set (``resolve``), release lists from the package index
(``releases``), constraints resolution cannot know (``constraints``), what a process
imports and from where (``probe``), running cells inside an environment (``cells``), and
feature detection over library APIs (``compat``). May import ``numerics.spec``/``runner``
only to run cells inside an environment; nothing in the core imports this package except
``compat`` (the CLI's ``env`` and ``run --pin`` use it).
"""
