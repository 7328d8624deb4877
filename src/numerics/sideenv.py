"""Side environments: run cells under other releases of transformers/peft/accelerate.

A version set is an *overlay*: a directory filled by ``pip install --target DIR
--no-deps <pins>`` and put first on ``PYTHONPATH`` for the main venv's Python.
The overlay's packages (and their ``.dist-info``, so ``importlib.metadata`` and
the traces report them) shadow the main venv's, while torch and DeepSpeed come
from the main venv: an overlay never holds torch, and costs seconds and a few
MB instead of a second venv. The rank processes are spawned by the subprocess
and inherit its environment and ``sys.path``, so they see the overlay too; each
record carries the versions the ranks themselves reported.

``--no-deps`` means the pins must be complete: every dependency the pinned
releases import that the main venv lacks, or holds at a version the pinned
release refuses (transformers 4.36 checks tokenizers<0.19 and
huggingface-hub<1.0 when imported), is pinned in the set too.

    python -m numerics.sideenv install peft-0.7.0
    python -m numerics.sideenv run peft-0.7.0   # the LoRA fp16-base client-AdamW cell; prints JSON records
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where overlays live (git-ignored); NUMERICS_SIDEENVS moves them, e.g. to a CI cache.
OVERLAY_ROOT = Path(os.environ.get("NUMERICS_SIDEENVS", REPO_ROOT / ".sideenvs"))
MARKER = ".numerics-overlay.json"
NEVER_IN_OVERLAY = ("torch", "deepspeed")  # always the main venv's: an overlay must not shadow them
INSTALL_TIMEOUT_S = 600.0


class SideEnvError(RuntimeError):
    """An overlay that cannot be installed, or a side run that did not produce records."""


@dataclass(frozen=True)
class VersionSet:
    """A named list of exact pins, installed together into one overlay."""

    name: str
    pins: tuple[str, ...]
    note: str = ""

    def pinned(self, package: str) -> str | None:
        """The version pinned for ``package`` (name compared as PyPI normalises it), or None."""
        for pin in self.pins:
            name, _, version = pin.partition("==")
            if _normalise(name) == _normalise(package):
                return version
        return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# transformers 4.36.2 (2023-12-18) and what it needs beside the main venv:
# - accelerate 0.25.0: the release of that month (peft 0.6/0.7 need >=0.21);
# - tokenizers 0.15.0 and huggingface_hub 0.20.1: the main venv's are newer than
#   transformers 4.36 accepts at import (tokenizers<0.19, huggingface-hub<1.0);
# - requests and its dependencies: transformers 4.36 and huggingface_hub 0.20 import
#   requests, which today's main venv does not have.
# safetensors, numpy, regex, tqdm, pyyaml, filelock, fsspec, packaging, psutil come from
# the main venv (their versions satisfy these releases' ranges).
TRANSFORMERS_4_36 = (
    "transformers==4.36.2",
    "accelerate==0.25.0",
    "tokenizers==0.15.0",
    "huggingface_hub==0.20.1",
    "requests==2.31.0",
    "urllib3==2.1.0",
    "charset_normalizer==3.3.2",
    "certifi==2023.11.17",
)

VERSION_SETS: dict[str, VersionSet] = {
    vset.name: vset
    for vset in (
        VersionSet("peft-0.6.2", ("peft==0.6.2", *TRANSFORMERS_4_36),
                   "the last release that creates LoRA adapters in fp32 on an fp16 base"),
        VersionSet("peft-0.7.0", ("peft==0.7.0", *TRANSFORMERS_4_36),
                   "creates LoRA adapters in the base dtype (fp16); autocast_adapter_dtype came later"),
    )
}


def get_version_set(name: str) -> VersionSet:
    try:
        return VERSION_SETS[name]
    except KeyError:
        raise SideEnvError(f"unknown version set {name!r}; known: {sorted(VERSION_SETS)}") from None


# -- installing -----------------------------------------------------------------------
def overlay_path(vset: VersionSet, root: Path | None = None) -> Path:
    return (root or OVERLAY_ROOT) / vset.name


def _marker_matches(path: Path, vset: VersionSet) -> bool:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return data.get("pins") == list(vset.pins) and data.get("python") == _python_tag()


def _python_tag() -> str:
    return f"{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}"


def _missing_version_error(vset: VersionSet, output: str) -> str | None:
    """pip's 'no such version' in words that name the pin, or None for any other failure."""
    found = re.search(r"Could not find a version that satisfies the requirement (\S+)(?: \(from versions: ([^)]*)\))?", output)
    if not found:
        found = re.search(r"No matching distribution found for (\S+)", output)
    if not found:
        return None
    requirement = found.group(1)
    available = found.group(2) if found.lastindex and found.lastindex >= 2 else None
    text = (f"version set {vset.name!r}: pip found no release {requirement} for {_python_tag()} on this platform "
            f"(check the pin in numerics.sideenv.VERSION_SETS)")
    if available:
        versions = [v.strip() for v in available.split(",") if v.strip()]
        text += f"; available: {', '.join(versions[-12:])}" + (" (newest last)" if len(versions) > 12 else "")
    return text


def _installed(path: Path) -> dict[str, str]:
    return {_normalise(d.metadata["Name"]): d.version for d in distributions(path=[str(path)])}


def ensure_overlay(vset: VersionSet, root: Path | None = None) -> Path:
    """The overlay directory of ``vset``, installed first if missing or stale.

    Idempotent and safe to call from several processes at once (a file lock);
    installs into a temporary directory that is renamed into place only when
    complete, so an interrupted install is never mistaken for an overlay.
    """
    path = overlay_path(vset, root)
    if _marker_matches(path, vset):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{vset.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker_matches(path, vset):  # another process installed it while we waited
            return path
        staging = path.parent / f".{vset.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        command = [sys.executable, "-m", "pip", "install", "--target", str(staging), "--no-deps",
                   "--no-compile", "--disable-pip-version-check", "--no-input", *vset.pins]
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise SideEnvError(f"version set {vset.name!r}: pip install ran past {INSTALL_TIMEOUT_S:.0f}s") from err
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            output = done.stdout + done.stderr
            raise SideEnvError(_missing_version_error(vset, output)
                               or f"version set {vset.name!r}: pip install failed ({done.returncode}):\n{output[-4000:]}")
        installed = _installed(staging)
        wrong = {pin for pin in vset.pins
                 if installed.get(_normalise(pin.partition("==")[0])) != pin.partition("==")[2]}
        leaked = [name for name in NEVER_IN_OVERLAY if (staging / name).exists() or name in installed]
        if wrong or leaked:
            shutil.rmtree(staging, ignore_errors=True)
            raise SideEnvError(f"version set {vset.name!r}: overlay holds {installed}; "
                               f"pins not met: {sorted(wrong)}; must not hold: {leaked}")
        (staging / MARKER).write_text(json.dumps({
            "pins": list(vset.pins), "python": _python_tag(), "installed": installed,
            "install_s": round(time.monotonic() - started, 2),
        }, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
    return path


def install_seconds(vset: VersionSet, root: Path | None = None) -> float | None:
    """How long the overlay's pip install took, as recorded when it was made."""
    try:
        return json.loads((overlay_path(vset, root) / MARKER).read_text()).get("install_s")
    except (OSError, ValueError):
        return None


def overlay_environment(path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the overlay first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONNOUSERSITE", None)
    return env


# -- running cells in an overlay ----------------------------------------------------------
def run_cells_in(vset: VersionSet, specs: list[Any], timeout: float = 900.0, root: Path | None = None,
                 backend: str | None = None, worker: int = 0) -> list[dict[str, Any]]:
    """Run ``specs`` (RunSpecs) through a `PoolSet` in a subprocess that sees ``vset``'s overlay.

    Verdicts are evaluated inside the subprocess (the reference run uses the same
    releases as the ranks). One JSON record per spec, in the order given: ``cell``,
    ``status``, ``verdicts`` ([invariant, status, message]), ``versions`` (what the
    ranks reported), ``host_versions`` and ``modules`` (what the subprocess imported,
    and from where), ``losses``, ``adapter`` facts and ``error``. ``backend`` and ``worker``
    go to the `PoolSet` (see numerics.plugin).
    """
    path = ensure_overlay(vset, root)
    payload = json.dumps({"overlay": str(path), "specs": [s.to_dict() for s in specs], "backend": backend, "worker": worker})
    command = [sys.executable, "-m", "numerics.sideenv", "run-json"]
    try:
        done = subprocess.run(command, input=payload, capture_output=True, text=True, timeout=timeout,
                              env=overlay_environment(path), cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-4000:]
        raise SideEnvError(f"cells in {vset.name!r} ran past {timeout:.0f}s:\n{tail!r}") from err
    records = _parse_records(done.stdout)
    if done.returncode != 0 or records is None:
        raise SideEnvError(f"cells in {vset.name!r} exited {done.returncode} without records:\n"
                           f"{done.stderr[-6000:]}\n{done.stdout[-2000:]}")
    return records


RECORDS_BEGIN, RECORDS_END = "<<<numerics-sideenv-records>>>", "<<<end-numerics-sideenv-records>>>"


def _parse_records(stdout: str) -> list[dict[str, Any]] | None:
    """The records between the markers: DeepSpeed and transformers also print to stdout."""
    start, end = stdout.rfind(RECORDS_BEGIN), stdout.rfind(RECORDS_END)
    if start < 0 or end < start:
        return None
    return json.loads(stdout[start + len(RECORDS_BEGIN):end])


def imported_from(overlay: str | None) -> dict[str, dict[str, Any]]:
    """Version and file of each tracked package as this process imports it."""
    from numerics.platform import TRACKED_PACKAGES, package_versions

    versions = package_versions()
    modules = {}
    for name in TRACKED_PACKAGES:
        module = __import__(name)
        file = str(Path(module.__file__).resolve())
        modules[name] = {"version": versions[name], "module_version": getattr(module, "__version__", None), "file": file,
                         "from_overlay": bool(overlay) and file.startswith(str(Path(overlay).resolve()) + os.sep)}
    return modules


def record_of(result: Any, host_versions: dict[str, str | None], modules: dict[str, Any]) -> dict[str, Any]:
    trace = result.outcome.trace
    meta = trace.meta if trace is not None else {}
    adapter_keys = ("trainable_dtypes", "frozen_dtypes", "stepped_dtypes", "optimizer_state_dtypes", "optimizer",
                    "lora_b_still_zero", "merge_logits_rel_error")
    return {
        "cell": result.spec.cell_id,
        "status": result.status,
        "verdicts": [[v.invariant, v.status, v.message] for v in result.verdicts],
        "versions": meta.get("versions"),
        "host_versions": host_versions,
        "modules": modules,
        "losses": trace.values("loss") if trace is not None else None,
        "adapter": {k: meta[k] for k in adapter_keys if k in meta},
        "error": result.outcome.error,
        "wall_s": result.outcome.wall_s,
    }


def _run_json(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Body of the subprocess: check the overlay shadows the main venv, run, evaluate."""
    from numerics.platform import package_versions
    from numerics.runner import PoolSet
    from numerics.spec import RunSpec

    overlay = payload.get("overlay")
    modules = imported_from(overlay)
    for name in NEVER_IN_OVERLAY:
        if modules[name]["from_overlay"]:
            raise SideEnvError(f"{name} was imported from the overlay {overlay}: it must come from the main venv")
    host_versions = package_versions()
    specs = [RunSpec.from_dict(d) for d in payload["specs"]]
    results: list[Any] = [None] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: specs[i].world_size)  # each pool starts once
    with PoolSet(payload.get("backend"), payload.get("worker", 0)) as pools:
        for index in order:
            results[index] = pools.run(specs[index])
    return [record_of(r, host_versions, modules) for r in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m numerics.sideenv", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="install the overlay of each version set named")
    install.add_argument("names", nargs="*", help=f"default: all of {sorted(VERSION_SETS)}")
    run = commands.add_parser("run", help="run cells in a version set's overlay; prints JSON records")
    run.add_argument("name")
    run.add_argument("--spec", action="append", default=[], help="a RunSpec as JSON (repeatable)")
    run.add_argument("--timeout", type=float, default=900.0)
    commands.add_parser("run-json", help=argparse.SUPPRESS)  # internal: {"overlay", "specs"} on stdin
    args = parser.parse_args(argv)

    if args.command == "install":
        for name in args.names or list(VERSION_SETS):
            vset = get_version_set(name)
            started = time.monotonic()
            path = ensure_overlay(vset)
            print(f"{name}: {path} ({time.monotonic() - started:.1f}s; install took {install_seconds(vset)}s)")
        return 0
    if args.command == "run":
        from numerics.spec import LORA_INVARIANTS, RunSpec

        specs = [RunSpec.from_dict(json.loads(text)) for text in args.spec] or [
            RunSpec(zero_stage=0, lora=True, base_dtype="fp16", optimizer_source="client", invariants=LORA_INVARIANTS)]
        print(json.dumps(run_cells_in(get_version_set(args.name), specs, args.timeout), indent=1))
        return 0
    records = _run_json(json.loads(sys.stdin.read()))
    sys.stdout.write(f"\n{RECORDS_BEGIN}{json.dumps(records)}{RECORDS_END}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
