"""What a cell leaves alive in its ranks (``engine_released``): nothing on today's releases, and
the whole ZeRO-3 engine on DeepSpeed 0.15.4, the real release, whose optimizer keeps its
parameters' AccumulateGrad nodes in a list: C++ holds the parameters, and the cycle back to the
optimizer is one the collector cannot see. Fixed in 0.16.3 (post-accumulate-grad hooks; `numerics
bisect deepspeed --good 0.16.9 --bad 0.15.4 --cells zero3-fp32-ws2 --invariant engine_released`)."""
import pytest
from conftest import PROBE

from numerics.run.launcher import RankPool
from numerics.show.plugin import worker_index
from numerics.versions.cells import run_cells_in
from numerics.versions.environments import build
from numerics.versions.resolve import parse_pins

pytestmark = pytest.mark.multigpu
ZERO3 = PROBE.with_(zero_stage=3)


@pytest.mark.parametrize("lora", [False, True], ids=["model", "lora"])
def test_a_zero3_cell_leaves_no_module_alive_in_its_ranks(lora, run_cell):
    """ZeRO-3 keeps every engine's model in module globals after ``destroy()`` (its forward module
    stack, a parameter coordinator's cache): 34 modules a cell, 186 with PEFT's, until
    ``drivers.release_zero3_leftovers`` drops them. Twice: the second cell starts where the first left."""
    for _ in range(2):
        result = run_cell(ZERO3.with_(lora=lora))
        assert result.status == "pass", result.story()
        assert result.outcome.trace.meta["modules_left_per_rank"] == [0, 0], \
            f"modules of the cell still alive, per rank: {result.outcome.trace.meta['modules_left_per_rank']}"
        assert next(v for v in result.verdicts if v.invariant == "engine_released").status == "pass"


def test_a_spawned_rank_does_not_count_what_its_imports_keep():
    """Ranks that are new interpreters (NCCL's, a cluster launcher's) import what forks of the
    preloaded server hold before their first cell: transformers keeps nine activation modules
    from its import on, which are not the cell's."""
    with RankPool(PROBE.world_size, fresh=True) as pool:
        outcome = pool.run(PROBE)
    assert outcome.ok, outcome.error
    assert outcome.trace.meta["modules_left_per_rank"] == [0, 0], outcome.trace.meta["modules_left_per_rank"]


def test_deepspeed_0_15_4_keeps_every_zero3_engine_and_the_cell_turns_red(request):
    environment = build(parse_pins(["deepspeed==0.15.4"]))
    [record] = run_cells_in(environment, [ZERO3], 900.0, backend=request.config.getoption("backend"),
                            worker=worker_index(request.config))
    assert record["versions"]["deepspeed"] == "0.15.4" and record["modules"]["deepspeed"]["from_overlay"], record
    verdicts = {invariant: (status, message) for invariant, status, message in record["verdicts"]}
    status, message = verdicts["engine_released"]
    assert status == "fail" and "still holds" in message, (record["status"], verdicts)
    assert record["measured"]["engine_released"]["modules_left"] > 20, record["measured"]  # the model: 33 modules
