"""The version matrix: axes parse or fail with exit 2, combinations are their product with the
baseline first, and the combined table marks what failed and what only moved."""
import json
import os
import subprocess
import sys

import pytest

from numerics.show.cli import main
from numerics.versions import combinations as vm
from numerics.versions.resolve import BadPins, Pin


@pytest.fixture
def published(monkeypatch):
    monkeypatch.setattr(vm, "check_published", lambda pins: None)


def test_axes_make_every_combination_with_the_baseline_first(published):
    combos = vm.combinations(vm.parse_axes(["deepspeed=0.18.0,0.19.8", "peft=0.6.2,0.7.0"]), ["transformers==4.36.2"])
    assert [vm.label(c) for c in combos] == [
        "deepspeed==0.18.0 peft==0.6.2 transformers==4.36.2", "deepspeed==0.18.0 peft==0.7.0 transformers==4.36.2",
        "deepspeed==0.19.8 peft==0.6.2 transformers==4.36.2", "deepspeed==0.19.8 peft==0.7.0 transformers==4.36.2"]


@pytest.mark.parametrize("axes, pins, says", [
    (["deepspeed"], [], "malformed --versions"),
    (["deepspeed=0.18.0", "deepspeed=0.19.8"], [], "names deepspeed twice"),
    (["peft=0.7.0"], ["peft==0.6.2"], "conflicting pins"),
    (["numpy=1.26.4"], [], "unsupported package"),
])
def test_bad_axes_are_refused_before_anything_builds(published, axes, pins, says):
    with pytest.raises(BadPins, match=says):
        vm.combinations(vm.parse_axes(axes), pins)


def test_bad_versions_exit_2(capsys):
    assert main(["run", "--versions", "deepspeed", "--cells", "zero1-fp32-ws2"]) == 2
    assert "malformed --versions" in capsys.readouterr().out


def record(cell: str, status: str, losses: list[float], failed: tuple[str, ...] = ()) -> dict:
    steps = [{"step": s, "loss": loss, "grad_norm": 1.0} for s, loss in enumerate(losses)]
    return {"cell": cell, "status": status, "trace": {"cell": cell, "spec": {"dtype": "fp32"}, "steps": steps},
            "verdicts": [{"invariant": name, "status": "fail", "reason": ""} for name in failed]}


def test_the_table_marks_a_failure_and_a_trace_that_only_moved(tmp_path):
    base = vm.Column((Pin("peft", "0.6.2"),), 0, {"a": record("a", "pass", [4.0, 3.9]), "b": record("b", "pass", [4.0, 3.9])})
    new = vm.Column((Pin("peft", "0.7.0"),), 1, {"a": record("a", "pass", [4.0, 3.8]),
                                                 "b": record("b", "fail", [4.0, "nan"], ("finite",))})
    rows = vm.compare_columns([base, new], ["a", "b"])
    assert rows["a"][1]["status"] == "pass" and rows["a"][1]["moved"].startswith("loss moved at step 1")
    assert rows["b"][1]["failed"] == ["finite"] and "moved at step 1" in rows["b"][1]["moved"]
    assert rows["a"][0]["moved"] is None
    vm.write_matrix([base, new], rows, tmp_path / "results.json")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["baseline"] == "peft==0.6.2" and data["cells"][0]["by_combination"]["peft==0.7.0"]["moved"]
    page = (tmp_path / "report.html").read_text()  # combinations side by side
    assert "<th>peft==0.7.0</th>" in page and "moved at step 1" in page


def pytest_in(*arguments: str, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments],
                          capture_output=True, text=True, env={**os.environ, **variables}, timeout=300)


def test_pytest_version_matrix_refuses_bad_axes_with_exit_2():
    done = pytest_in("--numerics-versions", "deepspeed", "tests/test_spec.py")
    assert done.returncode == 2 and "malformed --versions" in done.stdout


def test_inside_a_combination_every_cell_test_id_carries_it():
    done = pytest_in("--collect-only", "-m", "multigpu", "-k", "zero1-fp32-ws2", "tests/test_matrix.py",
                     NUMERICS_COMBINATION="peft==0.7.0-transformers==4.36.2")
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids and all(line.endswith("-peft==0.7.0-transformers==4.36.2]") for line in ids), done.stdout
