"""``numerics bisect``: the search on made-up release lists (monotone, skips, both
directions, ends that do not differ), raw verdicts that no known deviation can excuse,
the run side with fake environments and a fake runner (skips, the record cache), and bad
input as exit 2. Only the unpublished-release test asks the package index, and skips with
the reason when it cannot be reached."""
import pytest
from conftest import needs_index

from numerics.cell import matrix
from numerics.cell.faults import FAULTS
from numerics.cell.matrix import fault_cell
from numerics.show.cli import main
from numerics.show.report_page import render
from numerics.versions import bisect
from numerics.versions.bisect import (
    END_NOT_JUDGED,
    ENDS_DO_NOT_DIFFER,
    FOUND,
    ONLY_SKIPPED_LEFT,
    RecordCache,
    Request,
    judge_records,
    search,
)
from numerics.versions.environments import Environment
from numerics.versions.resolve import CannotBuild, Pin

RELEASES = [f"0.{minor}.0" for minor in range(10)]
TWIN = fault_cell(FAULTS["adapters_in_base_dtype"], clean=True)


def fake_judge(first_bad: str, skip: tuple[str, ...] = (), order: list[str] = RELEASES):
    """Bad from ``first_bad`` on in ``order``; ``skip`` cannot be judged. Records each call."""
    calls = []

    def judge(release: str) -> str:
        calls.append(release)
        if release in skip:
            return "skip"
        return "bad" if order.index(release) >= order.index(first_bad) else "good"

    judge.calls = calls
    return judge


def test_monotone_finds_the_first_bad_in_log_steps():
    judge = fake_judge("0.6.0")
    found = search(RELEASES, judge)
    assert (found.outcome, found.last_good, found.first_bad) == (FOUND, "0.5.0", "0.6.0")
    assert judge.calls[:2] == ["0.0.0", "0.9.0"]  # both ends first
    assert len(judge.calls) == len(set(judge.calls)) <= 2 + 4  # ends, then ceil(log2(8)) + 1 at most


def test_a_skipped_middle_is_stepped_around():
    found = search(RELEASES, fake_judge("0.6.0", skip=("0.4.0", "0.5.0")))
    assert found.outcome == ONLY_SKIPPED_LEFT  # 0.4.0 and 0.5.0 both stand between 0.3.0 and 0.6.0
    assert (found.last_good, found.first_bad, found.undecided) == ("0.3.0", "0.6.0", ("0.4.0", "0.5.0"))
    assert set(found.skipped) == {"0.4.0", "0.5.0"}


def test_a_skip_away_from_the_boundary_still_finds_it_exactly():
    found = search(RELEASES, fake_judge("0.6.0", skip=("0.4.0", "0.7.0")))
    assert (found.outcome, found.last_good, found.first_bad, found.undecided) == (FOUND, "0.5.0", "0.6.0", ())
    assert "0.4.0" in found.skipped


def test_reversed_range_finds_the_first_fixed_release():
    newest_first = RELEASES[::-1]  # good end (0.9.0, fixed) first, bad end (0.0.0) last
    found = search(newest_first, fake_judge("0.3.0", order=newest_first))  # 0.3.0 and older are bad
    assert (found.outcome, found.last_good, found.first_bad) == (FOUND, "0.4.0", "0.3.0")  # 0.4.0 fixed it


def test_a_good_end_that_fails_is_reported_not_searched():
    judge = fake_judge("0.0.0")
    found = search(RELEASES, judge)
    assert (found.outcome, found.first_bad, judge.calls) == (ENDS_DO_NOT_DIFFER, None, ["0.0.0", "0.9.0"])


def test_a_bad_end_that_passes_is_reported_not_searched():
    found = search(RELEASES, lambda release: "good")
    assert (found.outcome, found.tried) == (ENDS_DO_NOT_DIFFER, (("0.0.0", "good"), ("0.9.0", "good")))


@pytest.mark.parametrize("good_end, bad_end, outcome", [
    ("good", "skip", END_NOT_JUDGED), ("skip", "bad", END_NOT_JUDGED), ("skip", "skip", END_NOT_JUDGED),
    ("skip", "good", ENDS_DO_NOT_DIFFER), ("bad", "skip", ENDS_DO_NOT_DIFFER),  # one end alone says there is no change
])
def test_an_end_that_cannot_be_judged_stops_the_search(good_end, bad_end, outcome):
    found = search(["0.1.0", "0.2.0", "0.3.0"], {"0.1.0": good_end, "0.3.0": bad_end}.get)
    assert (found.outcome, found.first_bad, [r for r, _ in found.tried]) == (outcome, None, ["0.1.0", "0.3.0"])


def test_adjacent_releases_need_only_the_ends():
    judge = fake_judge("0.7.1", order=["0.7.0", "0.7.1"])
    found = search(["0.7.0", "0.7.1"], judge)
    assert (found.outcome, found.last_good, found.first_bad, judge.calls) == (FOUND, "0.7.0", "0.7.1", ["0.7.0", "0.7.1"])


def test_an_all_skipped_middle_leaves_every_middle_release_undecided():
    found = search(RELEASES, fake_judge("0.5.0", skip=tuple(RELEASES[1:-1])))
    assert (found.outcome, found.last_good, found.first_bad) == (ONLY_SKIPPED_LEFT, "0.0.0", "0.9.0")
    assert found.undecided == tuple(RELEASES[1:-1]) and set(found.skipped) == set(found.undecided)


# -- judging records ----------------------------------------------------------------------------
def record(cell: str, *verdicts: tuple[str, str], status: str = "fail", losses=None) -> dict:
    return {"cell": cell, "status": status, "verdicts": [[name, state, ""] for name, state in verdicts],
            "losses": losses or [2.0, 1.9, 1.8]}


TARGET = frozenset({("c", "parity_loss")})


@pytest.mark.parametrize("verdicts, status, expected", [
    ([("completes", "pass"), ("parity_loss", "fail")], "fail", "bad"),
    ([("completes", "pass"), ("parity_loss", "xfail")], "xfail", "bad"),  # a known deviation does not excuse it
    ([("completes", "pass"), ("parity_loss", "xpass")], "fail", "good"),  # nor turn a pass into a failure
    ([("completes", "pass"), ("parity_loss", "pass")], "pass", "good"),
    ([("completes", "fail")], "fail", "skip"),  # raised: another reason than the bisected one
    ([("completes", "pass"), ("parity_loss", "pass"), ("finite", "fail")], "fail", "skip"),
    ([("completes", "pass"), ("parity_loss", "pass"), ("finite", "xfail")], "xfail", "good"),  # explained: hides nothing
    ([("completes", "cannot run")], "cannot run", "skip"),
    ([("completes", "cannot build")], "cannot build", "skip"),
])
def test_a_release_is_judged_on_raw_verdicts_of_the_bisected_invariant(verdicts, status, expected):
    assert judge_records([record("c", *verdicts, status=status)], TARGET)[0] == expected


# -- the run side, with fake environments ---------------------------------------------------------
def request_for(good: str, bad: str) -> Request:
    return Request("peft", Pin("peft", good), Pin("peft", bad), (Pin("transformers", "4.36.2"),), (TWIN,), None, False)


class FakeReleases:
    """peft 0.6.0 ... 0.8.0 and 0.7.0rc1. ``cannot_build`` cannot build; the releases ``red`` says turn
    the twin red (adapter_dtype_policy fails, finite fails as a known deviation's xfail would
    show it, NaN from step 1). ``ran`` lists the releases whose cells really ran."""

    versions = ("0.6.0", "0.6.1", "0.6.2", "0.7.0rc1", "0.7.0", "0.7.1", "0.8.0")

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.cannot_build = "0.6.1"
        self.red = lambda version: version >= bisect.Version("0.7.0")


@pytest.fixture
def fake_releases(monkeypatch, tmp_path):
    fake = FakeReleases()
    monkeypatch.setattr(bisect.releases, "published_versions", lambda package: tuple(map(bisect.Version, fake.versions)))

    def build(pins, console):
        release = {p.name: p.version for p in pins}["peft"]
        if release == fake.cannot_build:
            raise CannotBuild("uv: no wheel")
        return Environment(tmp_path / "envs" / release, {"kind": "overlay"})

    def run_cells_in(environment, specs, timeout):
        release = environment.path.name
        fake.ran.append(release)
        red = fake.red(bisect.Version(release))
        losses = [2.3, float("nan"), float("nan")] if red else [2.3, 2.2, 2.1]
        return [record(spec.cell_id, ("completes", "pass"), ("adapter_dtype_policy", "fail" if red else "pass"),
                       ("finite", "xfail" if red else "pass"), status="fail" if red else "pass", losses=losses)
                for spec in specs]

    monkeypatch.setattr(bisect, "build", build)
    monkeypatch.setattr(bisect, "run_cells_in", run_cells_in)
    return fake


def test_bisect_names_the_first_bad_release_skips_what_cannot_build_and_reuses_its_cache(fake_releases, tmp_path):
    fake_releases.cannot_build, fake_releases.red = "0.6.2", lambda version: version >= bisect.Version("0.7.1")
    console = bisect.Console(quiet=True)
    cache = RecordCache(tmp_path / "cache")
    request = request_for("0.6.0", "0.8.0")
    found, judge = bisect.bisect(request, console, cache)
    assert found.releases == ("0.6.0", "0.6.1", "0.6.2", "0.7.0", "0.7.1", "0.8.0")  # no rc without --pre
    assert (found.outcome, found.last_good, found.first_bad) == (FOUND, "0.7.0", "0.7.1")
    assert found.skipped == ("0.6.2",) and "cannot build" in judge.trials["0.6.2"].reason
    data = bisect.summary(request, found, judge)
    assert data["boundary"] == {"first bad": "0.7.1", "last good": "0.7.0"}
    assert data["invariants"] == ["adapter_dtype_policy", "finite"] and data["cell"] == TWIN.cell_id
    assert data["losses"]["first_diverging_step"] == 1
    assert data["reproduce"][0] == f"numerics run --pin peft==0.7.1 --pin transformers==4.36.2 --full --cells {TWIN.cell_id}"
    lines = bisect.summary_lines(data)
    assert lines[:2] == ["first bad: peft==0.7.1", "last good: peft==0.7.0"] and "skipped: 0.6.2" in lines
    page = render(data)  # report.html: the last good and first bad release's losses overlaid
    assert "peft==0.7.1" in page and page.count("data:image/png;base64,") == 1
    ran_once = list(fake_releases.ran)
    found_again, judge_again = bisect.bisect(request, console, cache)
    assert (found_again.first_bad, fake_releases.ran) == ("0.7.1", ran_once)  # every record came from the cache
    assert all(trial.cached for trial in judge_again.trials.values() if trial.records)


def test_bisect_towards_a_fix_names_the_first_fixed_release(fake_releases, tmp_path):
    fake_releases.red = lambda version: version < bisect.Version("0.7.1")
    request = request_for("0.8.0", "0.6.0")
    found, judge = bisect.bisect(request, bisect.Console(quiet=True), RecordCache(tmp_path / "cache"))
    assert found.outcome == FOUND
    lines = bisect.summary_lines(bisect.summary(request, found, judge))
    assert lines[:2] == ["first fixed: peft==0.7.1", "last bad: peft==0.7.0"]


def test_a_bad_end_that_passes_exits_1_through_the_summary(fake_releases, tmp_path):
    request = request_for("0.6.0", "0.6.2")  # both green in the fake
    found, judge = bisect.bisect(request, bisect.Console(quiet=True), RecordCache(tmp_path / "cache"))
    data = bisect.summary(request, found, judge)
    assert (data["outcome"], data["exit"]) == (ENDS_DO_NOT_DIFFER, 1)
    assert bisect.summary_lines(data) == ["the ends do not differ: 0.6.0 good (passes); 0.6.2 good (passes)"]


def test_pre_releases_are_candidates_only_when_asked(fake_releases):
    request = bisect.Request("peft", Pin("peft", "0.6.2"), Pin("peft", "0.7.0"), (), (TWIN,), None, True)
    assert bisect.releases_between(request) == ["0.6.2", "0.7.0rc1", "0.7.0"]
    fixing = bisect.Request("peft", Pin("peft", "0.7.0"), Pin("peft", "0.6.2"), (), (TWIN,), None, False)
    assert bisect.releases_between(fixing) == ["0.7.0", "0.6.2"]


def test_the_fault_cells_clean_twins_can_be_selected_and_run_again():
    """What bisect reports, ``numerics run --full --cells`` selects."""
    assert [s.cell_id for s in matrix.named_cells("full", TWIN.cell_id)] == [TWIN.cell_id]
    assert TWIN.cell_id not in {s.cell_id for s in matrix.named_cells("full", None)}


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["numpy", "--good", "1.0", "--bad", "2.0"], "unsupported package in 'numpy==1.0'"),
    (["peft", "--good", "0.6.2", "--bad", "0.6.2"], "--good and --bad are the same release (peft==0.6.2)"),
    (["peft", "--good", "0.6.2", "--bad", "not-a-version"], "malformed pin 'peft==not-a-version'"),
    (["peft", "--good", "0.6.2", "--bad", "0.7.0", "--pin", "peft==0.7.0"], "--pin may not name peft"),
    (["peft", "--good", "0.6.2", "--bad", "0.7.0", "--cells", "no-such-cell*"], "no cell matches --cells 'no-such-cell*'"),
    (["peft", "--good", "0.6.2", "--bad", "0.7.0", "--invariant", "bogus"], "--invariant 'bogus' is not held"),
    (["peft", "--good", "0.6.2", "--bad", "0.7.0", "--cells", "zero1-*", "--", "tests/test_matrix.py"], "not both"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    assert main(["bisect", *argv]) == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_the_invariants_every_cell_is_held_to_can_be_bisected(capsys):
    """``engine_released`` and ``memory_bounded`` judge every cell without being declared by it."""
    assert main(["bisect", "peft", "--good", "0.6.2", "--bad", "0.7.0", "--cells", "zero3-fp32-ws2", "--invariant", "bogus"]) == 2
    held = " ".join(capsys.readouterr().out.split()).split("they hold ")[1].split(", ")
    assert {"engine_released", "memory_bounded", "finite"} <= set(held), held


@needs_index
def test_an_unpublished_release_exits_2_naming_the_nearest(capsys):
    assert main(["bisect", "peft", "--good", "0.6.3", "--bad", "0.7.1"]) == 2
    assert "peft==0.6.3 is not a published release; nearest: 0.6.0, 0.6.1, 0.6.2, 0.7.0" in capsys.readouterr().out


def test_a_pytest_selection_is_judged_by_the_cells_its_tests_ran(fake_releases, tmp_path, monkeypatch):
    """``-- PYTEST_SELECTION``: the tests run in each release's environment and the cells they
    ran (their --numerics-report) are judged like --cells records, and cached per selection."""
    import json
    import subprocess

    ran = []

    def pytest_in(command, env, cwd, capture_output, text, timeout):
        release = env["NUMERICS_FAKE_RELEASE"]
        ran.append(release)
        red = fake_releases.red(bisect.Version(release))
        steps = [{"step": 0, "loss": 2.3}, {"step": 1, "loss": "nan" if red else 2.2}]
        verdicts = [{"invariant": "finite", "status": "fail" if red else "pass", "message": ""}]
        cell = {"cell": TWIN.cell_id, "status": "fail" if red else "pass", "verdicts": verdicts, "trace": {"steps": steps}}
        report = command[command.index("--numerics-report") + 1]
        (bisect.Path(report) / "results.json").write_text(json.dumps({"cells": [cell]}))
        return subprocess.CompletedProcess(command, 1 if red else 0, "", "")

    monkeypatch.setattr(bisect.subprocess, "run", pytest_in)
    monkeypatch.setattr(bisect.Environment, "variables", lambda self: {"NUMERICS_FAKE_RELEASE": self.path.name})
    request = bisect.Request("peft", Pin("peft", "0.6.2"), Pin("peft", "0.7.1"), (Pin("transformers", "4.36.2"),), (),
                             None, False, ("tests/test_matrix.py", "-k", "lora_base_fp16"))
    cache = RecordCache(tmp_path / "cache")
    found, judge = bisect.bisect(request, bisect.Console(quiet=True), cache)
    assert (found.outcome, found.first_bad, found.last_good) == (FOUND, "0.7.0", "0.6.2")
    assert judge.trials["0.7.0"].records[0]["losses"][1] != judge.trials["0.7.0"].records[0]["losses"][1]  # NaN again
    assert "pytest tests/test_matrix.py -k lora_base_fp16" in bisect.summary(request, found, judge)["reproduce"][0]
    ran.clear()
    bisect.bisect(request, bisect.Console(quiet=True), cache)
    assert ran == []  # every release answered from the cache
