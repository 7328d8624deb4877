"""Shards: every item in exactly one shard, the same split on every runner, balanced by cost;
``numerics run --shard`` and ``pytest --numerics-shard`` split the real selections."""
import subprocess
import sys

import pytest

from numerics.cell import matrix
from numerics.show.cli import main
from numerics.show.shard import Shard, assign, load_costs, select


def test_every_item_lands_in_exactly_one_shard_in_input_order():
    items = [f"cell{i}" for i in range(23)]
    shards = assign(items, {f"cell{i}": float(i % 7 + 1) for i in range(23)}, 4)
    assert sorted(sum(shards, [])) == sorted(items)
    assert all(part == [i for i in items if i in part] for part in shards)


def test_split_is_balanced_by_cost_not_by_count():
    costs = {"slow": 10.0, **{f"fast{i}": 1.0 for i in range(10)}}
    heavy, light = assign(costs, costs, 2)
    assert heavy == ["slow"] and len(light) == 10  # 10 s against 10 s, not 6 items each


def test_unmeasured_items_cost_the_median_and_the_split_is_deterministic():
    items = ["a", "b", "c", "new"]
    costs = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert assign(items, costs, 2) == assign(list(items), dict(costs), 2)
    assert sorted(select(items, Shard(1, 2), costs) + select(items, Shard(2, 2), costs)) == items


@pytest.mark.parametrize("text", ["0/2", "3/2", "1-2", "a/b", "2"])
def test_bad_shard_is_refused(text):
    with pytest.raises(ValueError, match="shard"):
        Shard.parse(text)


def test_the_full_matrix_splits_into_near_equal_measured_halves():
    """On the shipped measurements: the two halves of the full matrix differ by under 10 %."""
    costs = load_costs("cells")
    ids = [spec.cell_id for spec in matrix.cells("full")]
    known = {i: costs[i] for i in ids if i in costs}
    assert len(known) > len(ids) / 4, "src/numerics/show/costs.json measures too few cells: rerun benchmarks/cell_costs.py"
    loads = [sum(known.get(i, 0.0) for i in part) for part in assign(ids, costs, 2)]
    assert max(loads) / min(loads) < 1.1, loads


def test_numerics_run_refuses_a_bad_shard(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--shard", "5/4"])
    assert "I must be between 1 and N" in capsys.readouterr().err


def test_pytest_shards_partition_the_collection():
    def collected(*extra: str) -> set[str]:
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               "tests/test_matrix.py", *extra], capture_output=True, text=True, timeout=300)
        return {line for line in done.stdout.splitlines() if "::" in line}

    whole = collected()
    first, second = collected("--numerics-shard", "1/2"), collected("--numerics-shard", "2/2")
    assert first and second and not first & second and first | second == whole
