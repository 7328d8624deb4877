"""A release that lacks an API a cell needs gives "cannot run" with the reason: never a
false fail (the numbers were not wrong) and never a false pass (nothing was checked)."""
import io
import json
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from numerics.cell.spec import RunSpec
from numerics.judge import deviations
from numerics.judge.invariants import Verdict
from numerics.run.launcher import CellOutcome
from numerics.run.runner import evaluate
from numerics.show.plugin import expect_pass
from numerics.show.report import print_report, write_report

SPEC = RunSpec(zero_stage=3, driver="trainer")
REASON = "transformers 4.30.0: TrainingArguments takes no 'eval_strategy' nor 'evaluation_strategy'"


@pytest.fixture
def result():
    return evaluate(CellOutcome(SPEC, cannot=("cannot run", REASON), wall_s=0.2))


def test_status_and_reason(result):
    assert result.status == "cannot run"
    assert result.first_failure.invariant == "completes" and REASON in result.first_failure.message


def test_reports_say_cannot_run_not_fail(result, tmp_path):
    write_report([result], tmp_path)
    cell = json.loads((tmp_path / "results.json").read_text())["cells"][0]
    assert cell["status"] == "cannot run"
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert suite.get("failures") == "0" and suite.get("skipped") == "1"
    assert REASON in suite.find("testcase/skipped").get("message")
    console = Console(file=io.StringIO(), width=200)
    print_report([result], console)
    assert "0 passed, 0 failed, 0 xfailed (known deviations), 1 cannot run" in console.file.getvalue()


def test_pytest_skips_with_the_reason(result):
    with pytest.raises(pytest.skip.Exception, match="eval_strategy"):
        expect_pass(result)


RACE = {"step": 3, "worst": 3e38, "ranks_wrong": 1, "ranks": 2, "steps_wrong": 1, "steps": 16}  # one rank, one step


@pytest.mark.parametrize("deepspeed, observed, expected", [
    ("0.19.5", "fail", "xfail"),   # the race showed
    ("0.19.5", "pass", "pass"),    # the race did not show this time: no unexpected pass
    ("0.19.8", "fail", "fail"),    # fixed release: a failure is a failure
])
def test_the_zero3_gather_race_is_known_only_where_measured(deepspeed, observed, expected):
    verdicts = [Verdict("gathered_params_match", observed, measured=RACE if observed == "fail" else {})]
    deviations.apply(verdicts, RunSpec(zero_stage=3).to_dict(), {"deepspeed": deepspeed})
    assert verdicts[0].status == expected


@pytest.mark.parametrize("shape, expected", [
    ({"ranks_wrong": 2, "steps_wrong": 1}, "xfail"),    # both ranks hit at one step (the sweep saw it on 3 cells)
    ({"ranks_wrong": 1, "steps_wrong": 16}, "xfail"),   # one rank at every step
    ({"ranks_wrong": 2, "steps_wrong": 16}, "fail"),    # every rank at every step: a wrong gather, not the race
])
def test_the_gather_race_skips_a_rank_or_a_step(shape, expected):
    verdicts = [Verdict("gathered_params_match", "fail", measured={**RACE, **shape})]
    deviations.apply(verdicts, RunSpec(zero_stage=3).to_dict(), {"deepspeed": "0.19.5"})
    assert verdicts[0].status == expected


def test_a_deterministic_deviation_that_stops_reproducing_is_an_unexpected_pass():
    verdicts = [Verdict("step0_grads", "pass")]
    deviations.apply(verdicts, RunSpec(zero_stage=0, dtype="fp16").to_dict(), {"deepspeed": "0.19.8"})
    assert verdicts[0].status == "xpass" and verdicts[0].failed


@pytest.mark.parametrize("message, expected", [
    ("RuntimeError: Output 0 of Split is a view and is being modified inplace.", "xfail"),  # the bisected crash
    ("timed out: ranks [0, 1] sent no result within 180s", "fail"),  # any other crash stays red
])
def test_a_known_crash_is_excused_only_by_what_it_says(message, expected):
    verdicts = [Verdict("completes", "fail", message)]
    deviations.apply(verdicts, RunSpec(zero_stage=2).to_dict(), {"deepspeed": "0.18.9"})
    assert verdicts[0].status == expected
    assert expected == "fail" or "first bad deepspeed==0.18.7" in verdicts[0].reason  # the report names the entry


def test_a_crash_of_a_bisected_release_is_judged_by_the_runner():
    from numerics.run.launcher import CellOutcome
    from numerics.run.runner import evaluate

    outcome = CellOutcome(RunSpec(zero_stage=1), error="rank 0 raised:\nRuntimeError: Output 0 of Split is a view ...")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("numerics.run.runner.package_versions", lambda: {"deepspeed": "0.18.7"})
        assert evaluate(outcome).status == "xfail"


def test_a_bf16_cell_on_a_gpu_without_bf16_cannot_run(monkeypatch):
    import torch

    from numerics.run.drivers import require_bf16_on_gpu
    from numerics.versions.compat import Unsupported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    with pytest.raises(Unsupported, match="Tesla V100 has no bf16"):
        require_bf16_on_gpu(RunSpec(dtype="fp16", comm_dtype="bf16"), {"backend": "nccl"})
    require_bf16_on_gpu(RunSpec(dtype="fp16"), {"backend": "nccl"})  # fp16 needs nothing on a GPU
    require_bf16_on_gpu(RunSpec(dtype="bf16"), {"backend": "gloo"})  # torch computes bf16 on any CPU


def sweep_module():
    """benchmarks/sweep.py, a script, loaded as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"
    loader = importlib.util.spec_from_file_location("sweep", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kept, expected", [
    ({"gathered_params_match": RACE}, "xfail (gathered_params_match)"),  # the race's signature
    ({"gathered_params_match": {**RACE, "ranks_wrong": 2, "steps_wrong": 16}}, "fail (gathered_params_match)"),  # a wrong gather
    (None, "xfail (gathered_params_match)"),  # a row recorded without figures: by cell and release only
])
def test_the_sweep_table_rejudges_a_failure_by_its_signature(kept, expected):
    spec = RunSpec(zero_stage=3)
    row = {"versions": {"deepspeed": "0.19.5"}, "cells": {spec.cell_id: "fail (gathered_params_match)"}, "why": {}}
    if kept is not None:
        row["measured"] = {spec.cell_id: kept}
    text, _ = sweep_module().rejudged(row, spec)
    assert text == expected


def test_the_compatibility_table_is_its_kept_results_judged_today():
    """docs/compatibility.md is rendered from docs/compatibility.json against today's deviation
    table: a changed entry, or a row added by hand, shows here until `sweep.py --render` is run."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    kept = json.loads((docs / "compatibility.json").read_text())
    assert sweep_module().markdown(kept) == (docs / "compatibility.md").read_text()
