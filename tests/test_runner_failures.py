"""Reliability: whatever fails while a cell is judged, started or measured fails that cell alone,
with a reason a person can read, and the next cell runs and passes as if nothing happened."""
import signal
import socket

import pytest
from conftest import GOOD_LOSSES, PROBE, SPEC, make_trace

from numerics.cell.invariant_sets import DEFAULT_INVARIANTS
from numerics.judge.invariants import INVARIANTS, check
from numerics.judge.thresholds import TrainingThresholds
from numerics.run import launcher
from numerics.run.launcher import CellOutcome, exit_description, merge_rank_traces
from numerics.run.runner import PoolSet, evaluate

HEALTHY_PEAKS = (430.0, 431.0)  # MiB per rank, as a real ws2 cell measures (thresholds.max_rank_rss_mib)


def outcome(trace=None, peaks=HEALTHY_PEAKS, left=(0, 0)) -> CellOutcome:
    """A completed cell of ``SPEC``: a healthy hand-made trace unless given one, with its ranks'
    peaks and the modules each left alive."""
    trace = make_trace() if trace is None else trace
    trace.meta.update(peak_rss_mib_per_rank=list(peaks), modules_left_per_rank=list(left))
    return CellOutcome(SPEC, trace=trace)


@pytest.fixture
def self_reference(monkeypatch):
    """The healthy hand-made trace is its own reference, as a healthy run's reference would be."""
    monkeypatch.setattr("numerics.run.runner.reference_trace", lambda spec, trace: make_trace())


def failures(result) -> dict[str, str]:
    return {v.invariant: v.message for v in result.verdicts if v.failed}


def test_a_healthy_hand_made_cell_passes(self_reference):
    """The baseline every test below returns to: what fails there fails because of what it injects."""
    result = evaluate(outcome())
    assert result.status == "pass", failures(result)


@pytest.mark.parametrize("target, stage", [
    ("numerics.run.runner.reference_trace", "reference"),
    ("numerics.run.runner.judge_na", "evaluate"),
    ("numerics.judge.deviations.apply", "deviations"),
])
def test_a_judging_stage_that_raises_fails_only_its_cell(target, stage, monkeypatch, self_reference):
    def broken(*args, **kwargs):
        raise RuntimeError(f"injected: {stage} is broken")

    with monkeypatch.context() as patch:
        patch.setattr(target, broken)
        broken_cell = evaluate(outcome())
    failed = failures(broken_cell)
    assert list(failed) == [stage], f"only the {stage} verdict should fail, got {failed}"
    assert "Traceback" in failed[stage] and f"injected: {stage} is broken" in failed[stage], failed[stage]
    assert SPEC.cell_id in failed[stage], "the message names the cell"
    assert evaluate(outcome()).status == "pass", "the next cell is judged as if nothing happened"


def test_a_trace_longer_than_its_reference_fails_parity_with_the_traceback(monkeypatch, self_reference):
    """16 steps judged against a 10-step reference: parity indexes past the reference's end."""
    with monkeypatch.context() as patch:
        patch.setattr("numerics.run.runner.reference_trace", lambda spec, trace: make_trace(losses=GOOD_LOSSES[:10]))
        failed = failures(evaluate(outcome()))
    assert set(failed) == {"parity_loss", "parity_grad_norm"}, f"the other invariants still judge the cell: {failed}"
    for message in failed.values():
        assert "raised:" in message and "IndexError" in message, message
    assert evaluate(outcome()).status == "pass"


def test_a_missing_metric_fails_the_invariants_that_read_it_and_no_other(self_reference):
    """A step without its loss (a driver that stopped recording it): the invariants that compare
    it with a number raise; each fails with its traceback, the rest are judged as usual."""
    trace = make_trace()
    trace.steps[2].loss = None
    verdicts = {v.invariant: v for v in check(trace, make_trace(), DEFAULT_INVARIANTS)}
    raised = {name for name, v in verdicts.items() if "raised:" in v.message}
    assert raised == {"no_collapse", "learns"}, {name: v.status for name, v in verdicts.items()}
    assert all(verdicts[name].status == "fail" and "TypeError" in verdicts[name].message for name in raised)
    assert verdicts["finite"].status == "pass" and verdicts["replicas_agree"].status == "pass"
    assert evaluate(outcome()).status == "pass"


def test_memory_bounded_fails_with_the_figure_of_the_rank_over_the_bound(self_reference):
    result = evaluate(outcome(peaks=(430.0, 1.0e6)))
    failed = failures(result)
    assert list(failed) == ["memory_bounded"], f"every cell is held to memory_bounded, declared or not: {failed}"
    assert "rank 1 peaked at 1000000 MiB" in failed["memory_bounded"], failed["memory_bounded"]
    memory = next(v for v in evaluate(outcome()).verdicts if v.invariant == "memory_bounded")
    assert memory.status == "pass" and "431 MiB (rank 1)" in memory.message, memory.message


def test_memory_bounded_says_nothing_was_compared_without_a_figure(self_reference):
    failed = failures(evaluate(outcome(peaks=(430.0, None))))
    assert list(failed) == ["memory_bounded"] and "nothing was compared" in failed["memory_bounded"], failed


@pytest.mark.parametrize("left, expected", [
    ((0, 33), "rank 1 still holds 33 torch modules"),  # DeepSpeed 0.15.4's ZeRO-3 engine, as measured
    ((0, None), "not counted on every rank"),           # n/a on a cell that must be judged: nothing was compared
])
def test_engine_released_fails_every_cell_that_leaves_its_model_alive(left, expected, self_reference):
    failed = failures(evaluate(outcome(left=left)))
    assert list(failed) == ["engine_released"], f"every cell is held to engine_released, declared or not: {failed}"
    assert expected in failed["engine_released"], failed["engine_released"]


def test_the_memory_bound_comes_from_the_environment(monkeypatch, self_reference):
    monkeypatch.setenv("NUMERICS_MAX_RSS_MIB", "400")
    monkeypatch.setattr("numerics.judge.invariants.THRESHOLDS", TrainingThresholds())
    assert "> 400 MiB" in failures(evaluate(outcome()))["memory_bounded"]
    monkeypatch.setenv("NUMERICS_MAX_RSS_MIB", "4 GiB")
    with pytest.raises(ValueError, match="NUMERICS_MAX_RSS_MIB='4 GiB' is not a number"):
        TrainingThresholds()


def test_every_ranks_measurements_are_kept_when_rank_traces_merge():
    ranks = [make_trace(), make_trace()]
    for trace, peak, left in zip(ranks, HEALTHY_PEAKS, (0, 23)):
        trace.meta.update(peak_rss_mib=peak, modules_left=left)
    merged = merge_rank_traces(ranks)
    assert merged.meta["peak_rss_mib_per_rank"] == list(HEALTHY_PEAKS)
    assert merged.meta["modules_left_per_rank"] == [0, 23]
    assert not {"peak_rss_mib", "modules_left"} & set(merged.meta), "rank 0's figure alone would read as the cell's"


@pytest.mark.parametrize("code, text", [
    (-signal.SIGKILL, "killed by signal SIGKILL"), (-signal.SIGSEGV, "killed by signal SIGSEGV"), (3, "exit code 3"),
])
def test_how_a_rank_ended_reads_in_words(code, text):
    assert exit_description(code) == text


# -- real runs -------------------------------------------------------------------------------------

@pytest.mark.multigpu
def test_an_invariant_that_raises_in_a_real_run_fails_only_its_cell(run_cell, monkeypatch):
    def broken(trace, reference):
        raise ZeroDivisionError("injected: no_spike has a bug")

    with monkeypatch.context() as patch:
        patch.setitem(INVARIANTS, "no_spike", broken)
        broken_cell = run_cell(PROBE)
    failed = failures(broken_cell)
    assert list(failed) == ["no_spike"], f"only the raising invariant fails: {failed}"
    assert "Traceback" in failed["no_spike"] and "injected: no_spike has a bug" in failed["no_spike"]
    assert run_cell(PROBE).status == "pass"


@pytest.mark.multigpu
def test_a_real_cell_records_every_ranks_peak_memory(run_cell):
    result = run_cell(PROBE)
    peaks = result.outcome.trace.meta["peak_rss_mib_per_rank"]
    assert len(peaks) == PROBE.world_size and all(50.0 < peak for peak in peaks), \
        f"a rank that imported torch and DeepSpeed holds hundreds of MiB: {peaks}"
    memory = next(v for v in result.verdicts if v.invariant == "memory_bounded")
    assert memory.status == "pass", memory.message


@pytest.fixture
def taken_port():
    """A port another program holds and listens on, as a server that got there first would."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.multigpu
def test_a_taken_port_is_retried_on_a_fresh_one(taken_port, monkeypatch):
    real_free_port, handed = launcher.free_port, []

    def free_port() -> int:
        handed.append(real_free_port() if handed else taken_port)
        return handed[-1]

    monkeypatch.setattr("numerics.run.launcher.free_port", free_port)
    with PoolSet() as pools:
        result = pools.run(PROBE)
        starts = pools.pools[PROBE.world_size].generation
    assert result.status == "pass", f"the retry on a fresh port should have run the cell: {failures(result)}"
    assert handed[0] == taken_port and len(handed) == starts == 2, f"ports handed out {handed}, starts {starts}"


@pytest.mark.multigpu
def test_a_pool_that_cannot_start_fails_its_cell_and_the_next_cell_starts_it(taken_port, monkeypatch):
    with PoolSet() as pools:
        with monkeypatch.context() as patch:
            patch.setattr("numerics.run.launcher.free_port", lambda: taken_port)
            refused = pools.run(PROBE)
        started = pools.run(PROBE)
    [verdict] = refused.verdicts
    assert refused.status == "fail" and verdict.invariant == "completes", refused.verdicts
    for told in ("rank pool failed to start", "attempt 2", f"port {taken_port}", "address already in use"):
        assert told in verdict.message, f"{told!r} missing from:\n{verdict.message}"
    assert started.status == "pass", f"the next cell starts the pool again: {failures(started)}"
