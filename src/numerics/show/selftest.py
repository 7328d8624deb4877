"""Detection power: every fault injected into a real run, and which invariants fired.

A fault is detected when at least one invariant it targets fails on it; the
same cell without the fault must pass. Every fault runs at each precision of
``matrix.fault_precisions``. No fault may go undetected, except a measured gap
listed in ``faults.UNDETECTED`` (which must then stay undetected), and no clean
cell may fail.
"""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from numerics.cell.faults import FAULTS, UNDETECTED, Fault
from numerics.cell.matrix import fault_cell, fault_precisions
from numerics.run.runner import CellResult, PoolSet


@dataclass
class DetectionRow:
    fault: Fault
    precision: str
    faulty: CellResult
    clean: CellResult

    @property
    def fired(self) -> list[str]:
        return [v.invariant for v in self.faulty.verdicts if v.failed]

    @property
    def detected(self) -> bool:
        return bool(set(self.fired) & set(self.fault.targets))

    @property
    def known_gap(self) -> str | None:
        """Why this fault goes undetected at this precision, where that is measured and known."""
        return UNDETECTED.get((self.fault.name, self.precision))

    @property
    def ok(self) -> bool:
        return self.detected != bool(self.known_gap) and self.clean.status != "fail"


def run_selftest(backend: str | None, console: Console, names: list[str] | None = None) -> list[DetectionRow]:
    rows = []
    with PoolSet(backend) as pools:
        for name in names or list(FAULTS):
            fault = FAULTS[name]
            for precision in fault_precisions(fault):
                console.print(f"fault {name} ({precision}): {fault.summary}", highlight=False)
                rows.append(DetectionRow(fault, precision, pools.run(fault_cell(fault, precision=precision)),
                                         pools.run(fault_cell(fault, clean=True, precision=precision))))
    return rows


def detection_table(rows: list[DetectionRow]) -> Table:
    table = Table(title="Fault detection")
    for column in ("fault", "precision", "cell", "targets", "invariants that fired", "detected", "clean twin"):
        table.add_column(column)
    for row in rows:
        spec = row.faulty.spec
        precision = spec.dtype + (f", LoRA on a {spec.base_dtype} base" if spec.lora else "")
        detected = ("[bold red]yes, a known gap closed: update faults.UNDETECTED[/]" if row.known_gap else "[green]yes[/]") \
            if row.detected else ("[yellow]no (known gap)[/]" if row.known_gap else "[bold red]NO[/]")
        table.add_row(row.fault.name, precision, spec.with_(fault=None).cell_id, ", ".join(row.fault.targets),
                      ", ".join(row.fired) or "-", detected,
                      row.clean.status)
    return table
