"""From the pins a person writes to the exact set of releases an environment must install.

Nobody writes co-dependencies by hand. The resolver (``uv pip install --dry-run``, run
against the interpreter the environment extends) keeps every installed distribution that
satisfies the requirements and names exactly what must change: for an overlay on the main
venv that is the pinned releases plus whichever of their dependencies the main venv lacks
or holds at a version they refuse (transformers 4.36.2 brings tokenizers 0.15.x along).
torch is always held to one exact version (the pinned one, or the interpreter's), so the
resolver can never reach for several GB of CUDA wheels by a range.

uv, not pip, because it resolves the same sets in ~1 s where pip takes 2-6 s (measured on
deepspeed==0.18.0, transformers==4.47.1, peft==0.7.0).

Two policies, tried in this order by `numerics.versions.environments`:

``minimal``
    the pins, and the fewest changes to the interpreter's packages that satisfy them.
``as-of-date``
    used when the minimal set does not import together (peft 0.7.0 beside transformers 5.x):
    every tracked Hugging Face package that is not pinned (transformers, peft, accelerate) is
    also pinned, to its newest final release uploaded before the newest pinned release was,
    i.e. the stack as it stood the day the pinned release came out. torch and DeepSpeed stay
    the interpreter's unless pinned: neither imports the Hugging Face stack, and DeepSpeed
    costs a build.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from uv import find_uv_bin

from numerics.run.platform import TRACKED_PACKAGES
from numerics.versions import releases
from numerics.versions.constraints import extra_constraints

DATED_PACKAGES = ("transformers", "peft", "accelerate")  # what the as-of-date policy pins
RESOLVE_TIMEOUT_S = 300.0


class BadPins(ValueError):
    """Pins a person wrote that name no buildable combination: a usage error (exit 2)."""


class CannotBuild(RuntimeError):
    """A valid combination that cannot be resolved, installed or imported; ``reason`` is one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, order=True)
class Pin:
    """One exact release, its name in canonical form (``huggingface-hub``)."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def parse_pins(texts: list[str]) -> tuple[Pin, ...]:
    """``PKG==V`` strings as sorted pins, each naming a tracked package once.

    Raises `BadPins` naming the offending input: malformed, an untracked package, or the
    same package twice at different versions. Whether the releases exist is
    `check_published`'s question, asked only when an environment is not built yet.
    """
    pins: dict[str, Pin] = {}
    for text in texts:
        pin = _parse_pin(text)
        if pins.get(pin.name, pin) != pin:
            raise BadPins(f"conflicting pins: {pins[pin.name]} and {pin}")
        pins[pin.name] = pin
    return tuple(sorted(pins.values()))


def _parse_pin(text: str) -> Pin:
    try:
        requirement = Requirement(text)
        [specifier] = requirement.specifier
        version = Version(specifier.version)
    except (InvalidRequirement, InvalidVersion, ValueError):
        raise BadPins(f"malformed pin {text!r}: write PKG==VERSION, e.g. peft==0.7.0") from None
    if specifier.operator != "==" or "*" in specifier.version or requirement.extras or requirement.marker:
        raise BadPins(f"malformed pin {text!r}: write PKG==VERSION, e.g. peft==0.7.0")
    name = canonicalize_name(requirement.name)
    if name not in TRACKED_PACKAGES:
        raise BadPins(f"unsupported package in {text!r}: pins may name {', '.join(TRACKED_PACKAGES)}")
    return Pin(name, str(version))


def check_published(pins: tuple[Pin, ...]) -> None:
    """Raises `BadPins` for the first pin the index has no such release of, with the nearest ones."""
    for pin in pins:
        if not releases.is_published(pin.name, pin.version):
            near = releases.nearest(pin.name, pin.version)
            raise BadPins(f"{pin} is not a published release; nearest: {', '.join(near) or 'none'}")


@dataclass(frozen=True)
class Resolution:
    """What an environment installs beside its interpreter's packages, and how it was found."""

    install: tuple[Pin, ...]
    policy: str
    seconds: float


def resolve(pins: tuple[Pin, ...], python: Path, torch_version: str, policy: str = "minimal",
            also: tuple[str, ...] = ()) -> Resolution:
    """The releases ``python`` must gain so that ``pins`` (and requirements ``also``) hold,
    under ``policy`` (see the module docstring). Raises `CannotBuild` with uv's reason."""
    started = time.monotonic()
    pinned = {pin.name: pin.version for pin in pins}
    requirements = [str(pin) for pin in pins + (_dated_pins(pins) if policy == "as-of-date" else ())]
    requirements += [entry.require for entry in extra_constraints(pinned)] + list(also)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraint_file:
        constraint_file.write(f"torch=={torch_version}\n")
        constraint_file.flush()
        done = subprocess.run([find_uv_bin(), "pip", "install", "--dry-run", "--python", str(python),
                               "--constraint", constraint_file.name, *requirements],
                              capture_output=True, text=True, timeout=RESOLVE_TIMEOUT_S)
    if done.returncode != 0:
        raise CannotBuild(uv_reason(done.stderr))
    install = tuple(sorted(Pin(canonicalize_name(name), version)
                           for name, version in re.findall(r"^ \+ (\S+)==(\S+)$", done.stderr + done.stdout, re.M)))
    return Resolution(install, policy, time.monotonic() - started)


def _dated_pins(pins: tuple[Pin, ...]) -> tuple[Pin, ...]:
    """The as-of-date policy: each unpinned Hugging Face package at its newest release
    uploaded before the newest pinned release."""
    uploads = [releases.upload_times(pin.name).get(Version(pin.version)) for pin in pins]
    if None in uploads:
        raise CannotBuild(f"PyPI has no upload date for {pins[uploads.index(None)]}, which the as-of-date policy needs")
    moment = max(uploads)
    pinned = {pin.name for pin in pins}
    dated = []
    for name in DATED_PACKAGES:
        version = None if name in pinned else releases.newest_before(name, moment)
        if version is not None:
            dated.append(Pin(name, str(version)))
    return tuple(dated)


def uv_reason(stderr: str) -> str:
    """uv's explanation as one sentence: its ``cause:`` paragraph joined, else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    cause = next((i for i, line in enumerate(lines) if line.startswith("cause:")), None)
    if cause is None:
        return f"uv: {lines[-1] if lines else 'failed without a message'}"
    text = " ".join([lines[cause].removeprefix("cause:").strip()] + lines[cause + 1:])
    return "uv: " + text.replace(". And because", ", and because")
