"""Detection power: every fault injected into a real run, and which invariants fired.

A fault is detected when at least one invariant it targets fails on it; the
same cell without the fault must pass. No fault may go undetected and no
clean cell may fail.
"""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from numerics.faults import FAULTS, Fault
from numerics.matrix import FAULT_PRECISIONS, fault_cell
from numerics.runner import CellResult, PoolSet


@dataclass
class DetectionRow:
    fault: Fault
    faulty: CellResult
    clean: CellResult

    @property
    def fired(self) -> list[str]:
        return [v.invariant for v in self.faulty.verdicts if v.failed]

    @property
    def detected(self) -> bool:
        return bool(set(self.fired) & set(self.fault.targets))

    @property
    def ok(self) -> bool:
        return self.detected and self.clean.status != "fail"


def run_selftest(backend: str | None, console: Console, names: list[str] | None = None,
                 precisions: tuple[str, ...] = FAULT_PRECISIONS) -> list[DetectionRow]:
    rows = []
    with PoolSet(backend) as pools:
        for name in names or list(FAULTS):
            fault = FAULTS[name]
            for precision in precisions:
                console.print(f"fault {name} ({precision}): {fault.summary}", highlight=False)
                rows.append(DetectionRow(fault, pools.run(fault_cell(fault, precision=precision)),
                                         pools.run(fault_cell(fault, clean=True, precision=precision))))
    return rows


def detection_table(rows: list[DetectionRow]) -> Table:
    table = Table(title="Fault detection")
    for column in ("fault", "precision", "cell", "targets", "invariants that fired", "detected", "clean twin"):
        table.add_column(column)
    for row in rows:
        spec = row.faulty.spec
        precision = spec.dtype + (f", LoRA on a {spec.base_dtype} base" if spec.lora else "")
        table.add_row(row.fault.name, precision, spec.with_(fault=None).cell_id, ", ".join(row.fault.targets),
                      ", ".join(row.fired) or "-", "[green]yes[/]" if row.detected else "[bold red]NO[/]",
                      row.clean.status)
    return table
