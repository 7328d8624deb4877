"""Environments for release pins: bad input is a usage error (exit 2), co-dependencies are
resolved without anyone writing them, a combination that cannot build says why in one
sentence and leaves nothing behind, and concurrent builders end with one environment.

Tests that need the package index skip, with the reason, when it cannot be reached."""
import json
import os
import subprocess
import sys

import pytest
from conftest import needs_index
from packaging.version import Version

from numerics.run.platform import package_versions
from numerics.show.cli import main
from numerics.versions import environments
from numerics.versions.cells import CANNOT_BUILD_EXIT, rank_versions
from numerics.versions.combinations import without_options
from numerics.versions.constraints import extra_constraints
from numerics.versions.resolve import BadPins, CannotBuild, Pin, check_published, parse_pins, resolve, uv_reason




@pytest.mark.parametrize("pins, message", [
    (["peft>=0.7"], "malformed pin 'peft>=0.7'"),
    (["peft"], "malformed pin 'peft'"),
    (["numpy==1.26.4"], "unsupported package in 'numpy==1.26.4': pins may name torch, deepspeed"),
    (["peft==0.7.0", "peft==0.6.2"], "conflicting pins: peft==0.7.0 and peft==0.6.2"),
])
def test_bad_pins_exit_2_naming_the_input(pins, message, capsys):
    assert main(["env", "build", *pins]) == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_pins_are_canonical_and_a_repeated_identical_pin_is_one():
    assert parse_pins(["transformers==4.36.2", "PEFT==0.7.0", "peft==0.7.0"]) == (
        Pin("peft", "0.7.0"), Pin("transformers", "4.36.2"))


def test_run_pin_is_forwarded_without_its_pins():
    argv = ["--pin", "peft==0.7.0", "--cells", "zero1-*", "--pin=transformers==4.36.2", "--report", "r"]
    assert without_options(argv, ("--pin",)) == ["--cells", "zero1-*", "--report", "r"]
    matrix = ["--versions", "peft=0.6.2,0.7.0", "--strict", "--cells", "x", "--report=r", "--full"]
    assert without_options(matrix, ("--pin", "--versions", "--report"), ("--strict",)) == ["--cells", "x", "--full"]


def test_run_pin_names_the_versions_the_ranks_reported(tmp_path):
    versions = {"torch": "2.13.0+cpu", "deepspeed": "0.18.0"}
    cells = [{"trace": {"meta": {"versions": versions}}}, {"trace": {"meta": {"versions": versions}}}, {"trace": None}]
    (tmp_path / "results.json").write_text(json.dumps({"cells": cells}))
    assert rank_versions(tmp_path / "results.json") == ["deepspeed 0.18.0, torch 2.13.0+cpu"]


def test_uv_conflict_becomes_one_sentence():
    stderr = ("error: No solution found when resolving dependencies\n"
              "  cause: Because transformers==4.36.2 depends on tokenizers>=0.14,<0.19 and you require "
              "transformers==4.36.2, we can conclude that you require tokenizers>=0.14,<0.19.\n"
              "         And because you require tokenizers==0.20.0, we can conclude that your requirements are unsatisfiable.\n")
    reason = uv_reason(stderr)
    assert reason.startswith("uv: Because transformers==4.36.2 depends on tokenizers>=0.14,<0.19")
    assert reason.count(". ") == 0 and reason.endswith("unsatisfiable.") and "\n" not in reason


def test_extra_constraints_apply_by_version_range():
    assert [e.require for e in extra_constraints({"transformers": "4.47.1"})] == ["accelerate<1.3"]
    assert [e.require for e in extra_constraints({"deepspeed": "0.13.5"})] == ["numpy<2"]
    assert extra_constraints({"transformers": "4.48.0", "deepspeed": "0.14.0"}) == []


@needs_index
def test_missing_release_exits_2_with_the_nearest_published(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(environments, "ENVS_ROOT", tmp_path)
    assert main(["env", "build", "peft==0.6.99"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "peft==0.6.99 is not a published release; nearest: 0.6.0, 0.6.1, 0.6.2, 0.7.0" in out
    assert not list(tmp_path.iterdir())


@needs_index
def test_pre_releases_are_offered_only_for_a_pre_release():
    with pytest.raises(BadPins) as final:
        check_published((Pin("transformers", "4.36.99"),))
    assert "rc" not in str(final.value)
    with pytest.raises(BadPins, match=r"nearest: .*5\.0\.0rc"):
        check_published((Pin("transformers", "5.0.0rc9"),))


@needs_index
def test_resolution_brings_the_co_dependencies_nobody_wrote():
    resolution = resolve(parse_pins(["transformers==4.36.2"]), environments.Path(sys.executable),
                         package_versions()["torch"])
    installed = {pin.name: Version(pin.version) for pin in resolution.install}
    assert installed["transformers"] == Version("4.36.2")
    assert Version("0.15") <= installed["tokenizers"] < Version("0.16"), resolution
    if "huggingface-hub" in installed:  # only when the main venv's is 1.0 or newer
        assert installed["huggingface-hub"] < Version("1.0"), resolution
    assert "torch" not in installed  # the main venv's torch satisfies it and stays


@needs_index
def test_as_of_date_policy_pins_the_stack_of_the_pinned_release_day():
    resolution = resolve(parse_pins(["peft==0.7.0"]), environments.Path(sys.executable), package_versions()["torch"],
                         policy="as-of-date")  # peft 0.7.0: 2023-12-06, transformers 4.36.0: 2023-12-11
    installed = {pin.name: pin.version for pin in resolution.install}
    assert (installed["peft"], installed["transformers"], installed["accelerate"]) == ("0.7.0", "4.35.2", "0.25.0")


@needs_index
def test_unresolvable_pins_cannot_build_in_one_sentence_leaving_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(environments, "ENVS_ROOT", tmp_path / "envs")
    pins = ["--pin", "peft==0.13.0", "--pin", "accelerate==0.20.0"]  # peft 0.13 requires accelerate>=0.21
    report = tmp_path / "report"
    assert main(["run", *pins, "--full", "--cells", "zero1-fp32-ws2", "--report", str(report)]) == CANNOT_BUILD_EXIT
    [cell] = json.loads((report / "results.json").read_text())["cells"]
    [failure] = environments.failures(tmp_path / "envs")
    reason = failure["reason"]
    assert failure["pins"] == ["accelerate==0.20.0", "peft==0.13.0"]
    assert reason.startswith("uv: Because peft==0.13.0 depends on accelerate>=0.21.0"), reason
    assert "\n" not in reason and reason.count(". ") == 0, reason
    assert cell["status"] == "cannot build" and cell["cell"] == "zero1-fp32-ws2"
    assert cell["verdicts"][0]["message"].endswith(f"accelerate==0.20.0 peft==0.13.0: {reason}"), cell["verdicts"]
    assert 'skipped="1"' in (report / "junit.xml").read_text()
    assert sorted(p.name for p in (tmp_path / "envs").iterdir()) == ["cannot-build"]  # no env, no staging left


@needs_index
def test_a_torch_release_without_a_local_wheel_cannot_build(tmp_path):
    with pytest.raises(CannotBuild, match=r"torch==2\.0\.1 has no \S+ wheel on this machine"):
        environments.build(parse_pins(["torch==2.0.1"]), root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["cannot-build"]


@needs_index
@pytest.mark.multigpu  # real installs and imports: ~10-20 s
def test_concurrent_builders_end_with_one_environment(tmp_path):
    code = ("import sys; from numerics.versions import environments as e; from numerics.versions.resolve import parse_pins; "
            "print(e.build(parse_pins(['peft==0.6.2'])).path)")
    env = {**os.environ, "NUMERICS_ENVS": str(tmp_path)}
    builders = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for _ in range(2)]
    outputs = [builder.communicate(timeout=600) for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0], outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    built = environments.environments(tmp_path)
    assert len(built) == 1 and paths == {str(built[0].path)}, (paths, built)
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    record = json.loads((built[0].path / environments.MARKER).read_text())
    assert record["install"] == ["peft==0.6.2"] and record["imports"]["peft"]["from_overlay"]
    assert not record["imports"]["torch"]["from_overlay"]
