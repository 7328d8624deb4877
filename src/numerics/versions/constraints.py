"""Constraints the resolver cannot know: a release's metadata accepts a dependency that
breaks it in practice. Each entry applies when a pinned release matches ``when`` and adds
``require`` to the requirements resolved (so it holds even for a package the pinned release
does not declare, such as accelerate for transformers' Trainer), with the reason it exists.

Metadata that is already right needs no entry (transformers 4.45 declares
``tokenizers>=0.20,<0.21`` itself, and the resolver honours it).
"""
from __future__ import annotations

from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


@dataclass(frozen=True)
class ExtraConstraint:
    """``require`` is added whenever a pinned release satisfies ``when``."""

    when: str
    require: str
    reason: str

    def applies_to(self, pins: dict[str, str]) -> bool:
        """True when ``pins`` (canonical name -> version) pins a release that ``when`` matches."""
        condition = Requirement(self.when)
        version = pins.get(canonicalize_name(condition.name))
        return version is not None and condition.specifier.contains(version, prereleases=True)


EXTRA_CONSTRAINTS: tuple[ExtraConstraint, ...] = (
    ExtraConstraint("deepspeed<0.14", "numpy<2",
                    "DeepSpeed before 0.14 predates NumPy 2 (June 2024) and declares numpy unbounded; "
                    "it uses NumPy 1 API that NumPy 2 removed"),
    ExtraConstraint("transformers>=4.47,<4.48", "accelerate<1.3",
                    "transformers 4.47's Trainer declares accelerate>=0.26 only, but predates the "
                    "accelerate 1.3 API changes its Trainer path meets"),
)


def extra_constraints(pins: dict[str, str]) -> list[ExtraConstraint]:
    """The table's entries that apply to ``pins`` (canonical name -> version)."""
    return [entry for entry in EXTRA_CONSTRAINTS if entry.applies_to(pins)]
