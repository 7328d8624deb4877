"""Compatibility sweep: a named subset of the matrix on one release per minor of deepspeed,
transformers and peft, each in its own environment (`numerics.versions`), as a table of
release x cell -> pass / fail (invariants) / xfail / cannot run / cannot build.

Each package's releases run the cells that exercise it: DeepSpeed the engine, LoRA and
Trainer cells at every stage; transformers the Trainer and LoRA cells; peft the LoRA cells.
The package under sweep is pinned; everything else is resolved by the environment's policy.
Results are kept per release in ``--out``, ``docs/compatibility.json`` beside the table and
tracked with it: an interrupted sweep picks up where it stopped, a run of one new release adds
its row to every kept one, and the table is rewritten from all of them after every release.

    .venv/bin/python benchmarks/sweep.py                       # the whole sweep (~1 h on 2 cores, cold)
    .venv/bin/python benchmarks/sweep.py --package peft        # one package
    .venv/bin/python benchmarks/sweep.py --package deepspeed --releases 0.18.0,0.19.5
    .venv/bin/python benchmarks/sweep.py --render              # re-judge the kept results, run nothing
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from packaging.version import Version

from numerics.cell.invariant_sets import LORA_INVARIANTS
from numerics.cell.spec import RunSpec
from numerics.judge import deviations
from numerics.judge.deviations import Deviation
from numerics.versions.cells import run_cells_in
from numerics.versions.environments import build
from numerics.versions.resolve import CannotBuild, Pin

ROOT = Path(__file__).resolve().parents[1]

ENGINE = [RunSpec(zero_stage=stage, dtype=dtype, grad_accum=ga, micro_batch=4 // ga)
          for stage, dtype, ga in ((0, "bf16", 1), (1, "fp32", 4), (2, "fp16", 1), (3, "bf16", 4), (3, "fp32", 1))]
LORA = [RunSpec(zero_stage=stage, lora=True, base_dtype=base, dtype=dtype, optimizer_source=source,
                invariants=LORA_INVARIANTS)
        for stage, base, dtype, source in ((0, "fp16", "fp32", "client"), (2, "fp32", "bf16", "config"),
                                           (3, "fp32", "fp32", "config"))]
TRAINER = [RunSpec(driver="trainer", zero_stage=stage, dtype=dtype, grad_accum=ga, micro_batch=4 // ga)
           for stage, dtype, ga in ((0, "fp32", 1), (2, "bf16", 4), (3, "fp32", 4))]

# package -> (one release per minor, oldest first; the cells that exercise it)
SWEEP: dict[str, tuple[list[str], list[RunSpec]]] = {
    "deepspeed": (["0.14.5", "0.15.4", "0.16.9", "0.17.6", "0.18.0", "0.18.9", "0.19.5", "0.19.8"],
                  ENGINE + LORA[1:] + TRAINER[1:]),
    "transformers": (["4.36.2", "4.37.2", "4.38.2", "4.39.3", "4.40.2", "4.41.2", "4.42.4", "4.43.4", "4.44.2",
                      "4.45.2", "4.46.3", "4.47.1", "4.48.3", "4.49.0", "5.24.0", "5.25.0"], TRAINER + LORA[1:2] + ENGINE[1:2]),
    "peft": (["0.6.2", "0.7.0", "0.10.0", "0.12.0", "0.13.2", "0.21.2", "0.22.0"], LORA),
}


def sweep_release(package: str, release: str, cells: list[RunSpec]) -> dict[str, Any]:
    """Build the release's environment and run ``cells`` in it; a record of what happened."""
    started = time.monotonic()
    try:
        environment = build((Pin(package, release),))
    except CannotBuild as err:
        return {"package": package, "release": release, "cannot_build": err.reason, "cells": {},
                "seconds": round(time.monotonic() - started)}
    records = run_cells_in(environment, cells, timeout=1800.0)
    return {"package": package, "release": release, "cannot_build": None, "seconds": round(time.monotonic() - started),
            "versions": next((r["versions"] for r in records if r.get("versions")), None),
            "cells": {r["cell"]: outcome(r) for r in records},
            "why": {r["cell"]: why(r) for r in records if r["status"] != "pass"},
            "measured": {r["cell"]: r.get("measured", {}) for r in records if r["status"] != "pass"}}


def outcome(record: dict[str, Any]) -> str:
    """``pass``, ``xfail (invariants)``, ``fail (invariants)``, both (``fail (a); xfail (b)``: a red
    cell still shows which known deviations it also matched) or ``cannot run: reason``."""
    status = record["status"]
    if status == "cannot run":
        return f"cannot run: {record['verdicts'][0][2].split('] ', 1)[-1]}"
    if status not in ("fail", "xfail"):
        return status
    groups = {label: [name for name, verdict, _ in record["verdicts"] if verdict in verdicts]
              for label, verdicts in (("fail", ("fail", "xpass")), ("xfail", ("xfail",)))}
    return "; ".join(f"{label} ({', '.join(names)})" for label, names in groups.items() if names)


def why(record: dict[str, Any]) -> list[str]:
    """The first lines of each verdict that did not pass, and of a crash's last traceback line."""
    lines = [f"{name} {verdict}: {message.splitlines()[0][:300] if message else ''}"
             for name, verdict, message in record["verdicts"] if verdict not in ("pass", "n/a")]
    if record.get("error"):
        lines.append(record["error"].strip().splitlines()[-1][:300])
    return lines


def rejudged(row: dict[str, Any], spec: RunSpec) -> tuple[str, list[Deviation]]:
    """A cell's outcome judged against today's known-deviation table: each invariant that
    failed raw (``fail`` or ``xfail`` when it ran) is ``xfail`` if an entry explains it at the
    release's versions (`explaining`), else ``fail``; and the entries that explained it."""
    text = row["cells"].get(spec.cell_id, "-")
    if text.startswith("cannot run"):
        return "cannot run", []  # its reason is listed below the table
    if not text.startswith(("fail (", "xfail (")):
        return text, []
    failed = [name for part in text.split("; ") for name in part.partition(" (")[2].rstrip(")").split(", ")]
    said = "\n".join(row.get("why", {}).get(spec.cell_id, []))  # what the failures said: a crash's last line too
    measured = row["measured"].get(spec.cell_id, {}) if "measured" in row else None
    known = {name: explaining(spec.to_dict(), name, row["versions"] or {}, said,
                              None if measured is None else measured.get(name, {})) for name in failed}
    red = [name for name in failed if known[name] is None]
    yellow = [name for name in failed if known[name] is not None]
    parts = ([f"fail ({', '.join(red)})"] if red else []) + ([f"xfail ({', '.join(yellow)})"] if yellow else [])
    return "; ".join(parts), [entry for entry in known.values() if entry is not None]


def explaining(spec: dict[str, Any], invariant: str, versions: dict[str, str | None], said: str,
               measured: dict[str, float] | None) -> Deviation | None:
    """The entry that covers this failure by cell and release and whose signature the measured
    figures fit, as a run judges it (`deviations.apply`); with no figures (a row recorded before
    the sweep kept them) the first entry by cell and release, its signature unchecked."""
    entries = deviations.matching(spec, invariant, versions, said)
    if measured is None:
        return next(iter(entries), None)
    return next((entry for entry in entries if entry.fits(measured, spec)), None)


def markdown(results: list[dict[str, Any]]) -> str:
    """One table per package: a row per release, a column per cell, judged against today's
    known deviations; then every entry that explained a cell."""
    lines = ["# Compatibility sweep", "", "Generated by `benchmarks/sweep.py`: each release's raw failures judged against",
             "today's known-deviation table (`src/numerics/judge/deviations.py`); the entries that matched are listed",
             "below the tables. A red cell is a failure no entry explains. Two reds stay on purpose: peft",
             "0.7.0-0.11.1 on the fp16-base LoRA cell with a client AdamW is incident 2 itself (adapters created",
             "in the fp16 base dtype, stepped by a pure-fp16 Adam: NaN from step 1), the regression",
             "`tests/test_real_release.py` shows the suite catching; `numerics bisect` names peft==0.7.0 as",
             "the first bad release and peft==0.12.0 as the first fixed. And every ZeRO-3 cell on deepspeed",
             "0.14.5 and 0.15.4 fails `engine_released`: each engine's model stays alive after `destroy()`",
             "(the optimizer's AccumulateGrad nodes hold the parameters from C++, a cycle the collector cannot",
             "see; fixed in 0.16.3, `numerics bisect` finds), which `tests/test_released_engines.py` shows on the",
             "real 0.15.4.", ""]
    if any("measured" not in row for row in results):
        lines += ["Some rows were recorded before the sweep kept each failure's figures: their failures are matched",
                  "by cell and release only, the entries' signatures unchecked. Run the sweep again to check them.", ""]
    matched: dict[str, Deviation] = {}
    for package in SWEEP:
        rows = sorted((r for r in results if r["package"] == package), key=lambda r: Version(r["release"]))
        if not rows:
            continue
        cells = [spec.cell_id for spec in SWEEP[package][1]]
        lines += [f"## {package}", "", "| release | " + " | ".join(f"`{c}`" for c in cells) + " |",
                  "|---|" + "---|" * len(cells)]
        for row in rows:
            if row["cannot_build"]:
                lines.append(f"| {row['release']} | cannot build: {row['cannot_build']} |" + " |" * (len(cells) - 1))
            else:
                judged = [rejudged(row, spec) for spec in SWEEP[package][1]]
                matched.update((entry.describe(), entry) for _, entries in judged for entry in entries)
                lines.append(f"| {row['release']} | " + " | ".join(text for text, _ in judged) + " |")
        lines.append("")
        lines += [f"- {row['release']}: {reason}" for row in rows for reason in _cannot_run_reasons(row)] + [""]
    lines += ["## The known deviations behind the yellow cells", ""]
    lines += [f"- **{name}**: {entry.reason}" for name, entry in matched.items()]
    return "\n".join(lines) + "\n"


def _cannot_run_reasons(row: dict[str, Any]) -> list[str]:
    return sorted({text for text in row["cells"].values() if text.startswith("cannot run")})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", choices=list(SWEEP), action="append", help="default: every package")
    parser.add_argument("--releases", help="comma-separated releases instead of the table's (one --package)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "compatibility.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "compatibility.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the table from --out, running nothing")
    args = parser.parse_args()
    if args.render:
        args.markdown.write_text(markdown(json.loads(args.out.read_text())))
        return 0
    if shutil.which("numactl") is None:  # DeepSpeed 0.14.x CPU accelerator runs it inside ZeRO-3
        parser.error("numactl is missing: apt-get install numactl (deepspeed 0.14's ZeRO-3 calls it on CPU)")
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    for package in args.package or list(SWEEP):
        releases, cells = SWEEP[package]
        for release in args.releases.split(",") if args.releases else releases:
            if any(r["package"] == package and r["release"] == release for r in done):
                continue
            print(f"== {package}=={release}: {len(cells)} cells", flush=True)
            result = sweep_release(package, release, cells)
            print(json.dumps(result, indent=1), flush=True)
            done.append(result)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(done, indent=1))
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(markdown(sorted(done, key=lambda r: list(SWEEP).index(r["package"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
