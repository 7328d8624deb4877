"""results.json, junit.xml and the terminal table, from hand-made cell results."""
import io
import json
import xml.etree.ElementTree as ET

import pytest
from conftest import result
from rich.console import Console

from numerics.cell.spec import RunSpec
from numerics.judge.invariants import Verdict
from numerics.run.launcher import CellOutcome
from numerics.run.runner import evaluate
from numerics.show.report import results_table, summary_line, write_report


@pytest.fixture
def results():
    passing = RunSpec(zero_stage=1)
    failing = RunSpec(zero_stage=2, dtype="bf16")
    known = RunSpec(zero_stage=0, dtype="fp16")
    crashed = RunSpec(zero_stage=3, fault="rank_raises")
    return [
        result(passing, Verdict("finite", "pass"), Verdict("parity_loss", "pass")),
        result(failing, Verdict("finite", "pass"),
               Verdict("parity_loss", "fail", f"[{failing.cell_id}] at step 5: loss 3.9 vs reference 3.8", 5)),
        result(known, Verdict("parity_loss", "xfail", "[...] at step 1: loss", 1, reason="ZeRO-0 fp16 scale")),
        # A cell that raised never reaches the reference, so evaluate() needs none.
        evaluate(CellOutcome(crashed, error="rank 1 raised:\nRuntimeError: boom", wall_s=0.5)),
    ]


def test_statuses_of_the_hand_made_results(results):
    assert [r.status for r in results] == ["pass", "fail", "xfail", "fail"]


def test_results_json_has_one_record_per_cell(results, tmp_path):
    write_report(results, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    cells = {c["cell"]: c for c in data["cells"]}
    assert list(cells) == [r.spec.cell_id for r in results]
    assert [c["status"] for c in cells.values()] == ["pass", "fail", "xfail", "fail"]
    assert cells[results[0].spec.cell_id]["final_loss"] == pytest.approx(3.7)
    assert cells[results[3].spec.cell_id]["final_loss"] is None
    assert "boom" in cells[results[3].spec.cell_id]["error"]
    failed = cells[results[1].spec.cell_id]["verdicts"]
    assert [(v["invariant"], v["status"], v["step"]) for v in failed][-1] == ("parity_loss", "fail", 5)
    assert data["summary"] == "1 passed, 2 failed, 1 xfailed (known deviations)"


def test_junit_marks_failures_with_the_invariant_and_xfails_as_skipped(results, tmp_path):
    write_report(results, tmp_path)
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "2", "1")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert list(cases) == [r.spec.cell_id for r in results]
    passing, failing, known, crashed = (cases[r.spec.cell_id] for r in results)
    assert len(passing) == 0
    assert failing.find("failure").get("message").startswith("parity_loss: ")
    assert "at step 5" in failing.find("failure").get("message")
    assert known.find("skipped").get("message") == "known deviation: ZeRO-0 fp16 scale"
    assert known.find("failure") is None
    assert crashed.find("failure").get("message").startswith("completes: ")
    assert "boom" in crashed.find("failure").text


def test_results_table_has_one_row_per_cell(results):
    table = results_table(results)
    assert table.row_count == len(results)
    console = Console(file=io.StringIO(), width=250)
    console.print(table)
    text = console.file.getvalue()
    assert all(r.spec.cell_id in text for r in results)
    assert "parity_loss:" in text and "at step 5" in text


@pytest.mark.parametrize("message", ["[zero2-bf16-ws2] at step 5", "[zero2-bf16-ws2] loss [/tmp/x]"])
def test_results_table_prints_messages_verbatim(message):
    spec = RunSpec(zero_stage=2, dtype="bf16")
    console = Console(file=io.StringIO(), width=250)
    console.print(results_table([result(spec, Verdict("parity_loss", "fail", message, 5))]))
    assert message in console.file.getvalue()


def test_the_fp16_lift_is_mentioned_only_when_an_fp16_cell_ran():
    def lifted(spec):
        passing = result(spec, Verdict("finite", "pass"))
        passing.outcome.trace.meta["fp16_check_lifted"] = True  # every rank lifts it at start
        return passing

    assert "fp16 check lifted" not in summary_line([lifted(RunSpec(dtype="bf16"))])
    assert "fp16 check lifted" in summary_line([lifted(RunSpec(dtype="bf16")), lifted(RunSpec(comm_dtype="fp16"))])
