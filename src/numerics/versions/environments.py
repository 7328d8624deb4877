"""Isolated environments for any combination of published releases, built once and reused.

Two kinds:

``overlay`` (torch not pinned)
    a directory filled by ``uv pip install --target DIR --no-deps`` with exactly the
    releases resolution says must differ from the main venv (`numerics.versions.resolve`),
    put first on ``PYTHONPATH`` for the main venv's Python. torch always comes from the
    main venv; a pinned DeepSpeed is built into the overlay with ``DS_BUILD_OPS=0`` and no
    build isolation, against that torch. Seconds and a few MB instead of a second venv.
``venv`` (torch pinned)
    a full ``python -m venv``: torch first, from a wheel on this machine (a PyPI torch
    wheel is a CUDA build of several GB), then everything else resolved against it.

An environment is cached under ``.numerics/envs/`` (or ``NUMERICS_ENVS``) by a hash of its
resolved set and what it builds on (the Python tag; for an overlay also the main venv's
torch), and found again by the pins that asked for it. It is built
in a staging directory under a file lock and renamed into place; it is complete only once
its ``environment.json`` is written, after its packages imported together (torch from the
main venv, pinned releases from the environment) and, when it holds its own DeepSpeed,
its CPU ops were JIT-built into its own ``TORCH_EXTENSIONS_DIR`` (two DeepSpeed releases
never share a stale op). Anything that cannot be resolved, installed or imported raises
`CannotBuild` with a one-sentence reason, recorded so ``numerics env list`` shows it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator

from packaging.specifiers import SpecifierSet
from rich.console import Console
from uv import find_uv_bin

from numerics.run.platform import TRACKED_PACKAGES
from numerics.versions.probe import OVERLAY_VARIABLE
from numerics.versions.releases import IndexUnreachable
from numerics.versions.resolve import CannotBuild, Pin, Resolution, check_published, resolve

REPO_ROOT = Path(__file__).resolve().parents[3]
ENVS_ROOT = Path(os.environ.get("NUMERICS_ENVS", REPO_ROOT / ".numerics" / "envs"))
MARKER = "environment.json"
FAILURES = "cannot-build"
POLICIES = ("minimal", "as-of-date")
NUMERICS_REQUIREMENTS = ("numpy", "packaging", "rich", "uv")  # what a full venv needs to run numerics itself
STEP_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Environment:
    """A complete environment on disk, as its ``environment.json`` describes it."""

    path: Path
    record: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def python(self) -> Path:
        return interpreter(self.path, self.kind)

    def variables(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) set up to import from this environment."""
        return environment_variables(self.path, self.kind, self.record.get("holds_deepspeed", False), base)

    def mark_used(self) -> None:
        """Record the time of use, which ``numerics env prune --unused-days`` reads."""
        _write_record(self.path, {**self.record, "used": time.time()})


def interpreter(path: Path, kind: str) -> Path:
    """The Python cells run under: a venv's own, or the main venv's for an overlay."""
    return path / "venv" / "bin" / "python" if kind == "venv" else Path(sys.executable)


def environment_variables(path: Path, kind: str, holds_deepspeed: bool,
                          base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the environment's packages first
    on ``PYTHONPATH`` (for a venv: this repository's sources, which it does not install), and
    its own ``TORCH_EXTENSIONS_DIR`` when it holds its own DeepSpeed."""
    env = dict(os.environ if base is None else base)
    packages = path / ("venv" if kind == "venv" else "site")
    first = str(REPO_ROOT / "src") if kind == "venv" else str(packages)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (first, env.get("PYTHONPATH", "")) if p)
    env[OVERLAY_VARIABLE] = str(packages)
    if holds_deepspeed:
        env["TORCH_EXTENSIONS_DIR"] = str(path / "torch_extensions")
    return env


# -- building -------------------------------------------------------------------------
class ImportFailed(CannotBuild):
    """The installed set does not import together; the next resolution policy may still."""


def build(pins: tuple[Pin, ...], console: Console | None = None, root: Path | None = None) -> Environment:
    """The environment for ``pins`` (from `parse_pins`), reused or built.

    Raises `BadPins` for a release the index does not have. Tries the resolution policies
    in order; raises `CannotBuild` (and records it) when none yields a set that installs
    and imports.
    """
    console = console or Console(stderr=True)
    root = root or ENVS_ROOT
    found = find(pins, root)
    if found is not None:
        console.print(f"reusing {found.path} for {_pins_text(pins)}")
        return found
    started = time.monotonic()
    try:
        check_published(pins)
        environment = _build_first_policy_that_imports(pins, console, root)
    except (CannotBuild, IndexUnreachable) as err:
        reason = getattr(err, "reason", str(err))
        _record_failure(root, pins, reason)
        console.print(f"[bold]cannot build[/] {_pins_text(pins)}: {reason}", highlight=False)
        raise CannotBuild(reason) from err
    (_failure_path(root, pins)).unlink(missing_ok=True)
    console.print(f"{_pins_text(pins)}: {environment.path} ready in {time.monotonic() - started:.1f}s")
    return environment


def _build_first_policy_that_imports(pins: tuple[Pin, ...], console: Console, root: Path) -> Environment:
    if any(pin.name == "torch" for pin in pins):
        return _build_venv(pins, console, root)
    torch_version = version("torch")
    failures = []
    for policy in POLICIES:
        with _phase(console, f"resolving {_pins_text(pins)} ({policy})"):
            resolution = resolve(pins, Path(sys.executable), torch_version, policy)
        console.print(f"  {policy}: {_pins_text(resolution.install) or 'nothing to install'}", highlight=False)
        try:
            return _build_overlay(pins, resolution, console, root)
        except ImportFailed as err:
            failures.append(f"{policy}: {err}")
            console.print(f"  {policy} set does not import: {err}", highlight=False)
    raise CannotBuild(f"no resolution imports together ({'; '.join(failures)})")


def _build_overlay(pins: tuple[Pin, ...], resolution: Resolution, console: Console, root: Path) -> Environment:
    install = tuple(pin for pin in resolution.install if pin.name != "torch")
    base = _base(pins)
    key = _key("overlay", base, install)
    with _locked(root, key) as path:
        if (path / MARKER).exists():
            return _adopt(path, pins)
        holds_deepspeed = any(pin.name == "deepspeed" for pin in install)
        started = time.time()
        with _staging(root, key) as staging:
            with _phase(console, f"installing {len(install)} packages"):
                _uv_install(["--target", str(staging / "site"), "--python", sys.executable], _texts(install))
            with _phase(console, "import check"):
                imports = _import_check(staging, "overlay", pins, install, holds_deepspeed)
            staging.rename(path)
        return _finish(path, console, started, {
            "kind": "overlay", "base": base, "pins": [_texts(pins)], "policy": resolution.policy,
            "install": _texts(install), "resolve_s": round(resolution.seconds, 2), "imports": imports,
            "holds_deepspeed": holds_deepspeed})


def _build_venv(pins: tuple[Pin, ...], console: Console, root: Path) -> Environment:
    """A full venv for a torch pin. Keyed by its pins: its resolution needs its torch installed."""
    [torch] = [pin for pin in pins if pin.name == "torch"]
    base = _base(pins)
    key = _key("venv", base, pins)
    with _locked(root, key) as path:
        if (path / MARKER).exists():
            return _adopt(path, pins)
        console.print(f"torch is pinned: building a full venv (python -m venv, {torch} first, then the rest)")
        started = time.time()
        with _staging(root, key) as staging:
            python = interpreter(staging, "venv")
            with _phase(console, "creating the venv"):
                _run([sys.executable, "-m", "venv", str(staging / "venv")], "python -m venv")
            wheel = _local_torch_wheel(torch)
            with _phase(console, f"installing {torch} from {wheel}"):
                _uv_install(["--python", str(python)], [wheel], with_dependencies=True)
            unpinned = [name for name in TRACKED_PACKAGES if name not in {pin.name for pin in pins}]
            rest = tuple(pin for pin in pins if pin != torch)
            with _phase(console, f"resolving {_pins_text(rest) or 'the tracked packages'} against {torch}"):
                resolution = resolve(rest, python, torch.version, also=(*unpinned, *NUMERICS_REQUIREMENTS))
            install = tuple(pin for pin in resolution.install if pin.name != "torch")
            with _phase(console, f"installing {len(install)} packages"):
                _uv_install(["--python", str(python)], _texts(install))
            with _phase(console, "import check"):
                imports = _import_check(staging, "venv", pins, pins, True)
            staging.rename(path)
        return _finish(path, console, started, {
            "kind": "venv", "base": base, "pins": [_texts(pins)], "policy": resolution.policy,
            "install": _texts((torch, *install)), "resolve_s": round(resolution.seconds, 2), "imports": imports,
            "holds_deepspeed": True})


def _finish(path: Path, console: Console, started: float, record: dict[str, Any]) -> Environment:
    """Build the DeepSpeed ops an environment holds, then mark it complete."""
    record["created"] = started
    if record["holds_deepspeed"]:
        with _phase(console, "building DeepSpeed's CPU ops"):
            try:
                _run([str(interpreter(path, record["kind"])), "-m", "numerics.show.cli", "prepare"], "numerics prepare",
                     env=environment_variables(path, record["kind"], True))
            except CannotBuild:
                shutil.rmtree(path, ignore_errors=True)
                raise
    record.update(used=time.time(), built_s=round(record["resolve_s"] + time.time() - started, 2))
    _write_record(path, record)
    return Environment(path, record)


def _adopt(path: Path, pins: tuple[Pin, ...]) -> Environment:
    """A complete environment another pin set already built: remember these pins find it too."""
    record = json.loads((path / MARKER).read_text())
    if _texts(pins) not in record["pins"]:
        record["pins"].append(_texts(pins))
        _write_record(path, record)
    return Environment(path, record)


def _local_torch_wheel(torch: Pin) -> str:
    """A requirement for ``torch`` that installs from a wheel on this machine (pip's find-links
    and ``file://`` indexes; the main index is replaced by an empty one), never a download."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
                           "--ignore-installed", "--only-binary", ":all:", "--index-url", "file:///var/empty",
                           "--report", "-", str(torch)], capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    try:
        [item] = json.loads(done.stdout)["install"]
        url = item["download_info"]["url"]
    except (ValueError, KeyError):
        url = ""
    if not url.startswith("file:"):
        raise CannotBuild(f"{torch} has no {_python_tag()} wheel on this machine (pip's find-links and file:// "
                          f"indexes), and a torch download is several GB of CUDA wheels this tool does not fetch")
    return f"torch @ {url}"


def _import_check(staging: Path, kind: str, pins: tuple[Pin, ...], installed: tuple[Pin, ...],
                  holds_deepspeed: bool) -> dict[str, Any]:
    """Import every tracked package in the new environment: each pinned one at its version,
    from the environment when it was installed there (a pin the main venv already meets is
    not), and torch from the main venv unless pinned."""
    env = environment_variables(staging, kind, holds_deepspeed)
    python = interpreter(staging, kind)
    done = subprocess.run([str(python), "-m", "numerics.versions.probe"], capture_output=True, text=True,
                          env=env, timeout=STEP_TIMEOUT_S, cwd=str(REPO_ROOT))
    if done.returncode != 0:
        raise ImportFailed(_last_line(done.stderr))
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    from_environment = {pin.name for pin in installed}
    for pin in pins:
        seen = modules[pin.name]
        if not SpecifierSet(f"=={pin.version}").contains(seen["version"] or "0", prereleases=True) \
                or seen["from_overlay"] != (pin.name in from_environment):  # ==2.13.0 admits 2.13.0+cpu
            expected = "the environment" if pin.name in from_environment else "the main venv"
            raise ImportFailed(f"{pin.name} imported as {seen['version']} from {seen['file']}, "
                               f"not {pin.version} from {expected}")
    if kind == "overlay" and modules["torch"]["from_overlay"]:
        raise ImportFailed(f"torch imported from the overlay ({modules['torch']['file']}), not the main venv")
    return modules


def _uv_install(target: list[str], requirements: list[str], with_dependencies: bool = False) -> None:
    """Install ``requirements`` into ``target``; without their dependencies unless asked (those
    were resolved already). A DeepSpeed sdist builds against the target's torch, without its ops."""
    if not requirements:
        return
    dependencies = [] if with_dependencies else ["--no-deps"]
    _run([find_uv_bin(), "pip", "install", *dependencies, "--no-build-isolation-package", "deepspeed", *target,
          *requirements], "uv pip install", env={**os.environ, "DS_BUILD_OPS": "0"})


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run one build step; a failure becomes `CannotBuild` with the step's last error line."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT_S,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        raise CannotBuild(f"{what} ran past {STEP_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        raise CannotBuild(f"{what}: {_last_line(done.stderr + done.stdout)}")


# -- finding, listing, pruning -----------------------------------------------------------
def find(pins: tuple[Pin, ...], root: Path | None = None) -> Environment | None:
    """The complete environment some earlier build of exactly ``pins`` produced, if any."""
    wanted = _texts(pins)
    for environment in environments(root):
        if wanted in environment.record["pins"] and environment.record["base"] == _base(pins):
            return environment
    return None


def environments(root: Path | None = None) -> list[Environment]:
    """Every complete environment under ``root``, oldest first."""
    found = []
    for marker in (root or ENVS_ROOT).glob(f"*/{MARKER}"):
        with contextlib.suppress(OSError, ValueError):
            found.append(Environment(marker.parent, json.loads(marker.read_text())))
    return sorted(found, key=lambda e: e.record["created"])


def failures(root: Path | None = None) -> list[dict[str, Any]]:
    """The recorded "cannot build" outcomes: pins, reason, when."""
    return [json.loads(path.read_text()) for path in sorted((root or ENVS_ROOT).glob(f"{FAILURES}/*.json"))]


def size_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())


def prune(root: Path | None = None, unused_days: float | None = None, pins: tuple[Pin, ...] = ()) -> list[Path]:
    """Remove environments (and "cannot build" records): all, those not used for
    ``unused_days``, or those built for ``pins``. Returns what was removed."""
    root = root or ENVS_ROOT
    removed = []
    for environment in environments(root):
        if unused_days is not None and time.time() - environment.record["used"] < unused_days * 86400:
            continue
        if pins and _texts(pins) not in environment.record["pins"]:
            continue
        with _locked(root, environment.path.name) as path:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(environment.path)
    if unused_days is None and not pins:
        removed += _remove_debris(root)
    if unused_days is None:
        records = [_failure_path(root, pins)] if pins else list(root.glob(f"{FAILURES}/*.json"))
        for record in records:
            if record.exists():
                record.unlink()
                removed.append(record)
    return removed


def _remove_debris(root: Path) -> list[Path]:
    """Remove what killed builds left (a directory without ``environment.json``, a staging
    directory) unless a live builder holds its lock."""
    removed = []
    for path in root.iterdir() if root.exists() else ():
        key = path.name.lstrip(".").partition(".staging-")[0]
        if not path.is_dir() or path.name == FAILURES or (path / MARKER).exists():
            continue
        with open(root / f".{key}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built right now
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# -- helpers ----------------------------------------------------------------------------
@contextlib.contextmanager
def _phase(console: Console, text: str) -> Iterator[None]:
    """A status line while a build phase runs, and its time when it is done."""
    started = time.monotonic()
    with console.status(text):
        yield
    console.print(f"  {text}: {time.monotonic() - started:.1f}s", highlight=False)


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[Path]:
    """Hold ``key``'s lock: one builder (or pruner) of an environment at a time."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root / key


@contextlib.contextmanager
def _staging(root: Path, key: str) -> Iterator[Path]:
    """A fresh directory to build in, removed unless the build renamed it into place; and
    the final path cleared of a build that died before completing."""
    shutil.rmtree(root / key, ignore_errors=True)
    staging = root / f".{key}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _key(kind: str, base: str, pins: tuple[Pin, ...]) -> str:
    text = json.dumps([kind, base, _texts(pins)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record_failure(root: Path, pins: tuple[Pin, ...], reason: str) -> None:
    path = _failure_path(root, pins)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pins": _texts(pins), "reason": reason, "when": time.time()}, indent=1))


def _failure_path(root: Path, pins: tuple[Pin, ...]) -> Path:
    return root / FAILURES / f"{_key('pins', _python_tag(), pins)}.json"


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """Atomically: a reader sees the old record or the new one, never half of one."""
    temporary = path / f".{MARKER}.{os.getpid()}"
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(path / MARKER)


def _base(pins: tuple[Pin, ...]) -> str:
    """What an environment for ``pins`` builds on: the Python, and for an overlay the main
    venv's torch (a pinned DeepSpeed and its ops are built against it)."""
    if any(pin.name == "torch" for pin in pins):
        return _python_tag()
    return f"{_python_tag()} torch {version('torch')}"


def _python_tag() -> str:
    return f"{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}"


def _texts(pins: tuple[Pin, ...]) -> list[str]:
    return [str(pin) for pin in pins]


def _pins_text(pins: tuple[Pin, ...]) -> str:
    return " ".join(_texts(pins))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("WARNING")]
    return lines[-1] if lines else "failed without a message"
