"""The default matrix (``--numerics-cover pairs|full``, ``--numerics-full``): every cell passes or is a known deviation."""
import pytest

from numerics.cell import matrix
from numerics.show.plugin import expect_pass

pytestmark = pytest.mark.multigpu


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" in metafunc.fixturenames:
        config = metafunc.config
        specs = matrix.cells(config.getoption("numerics_cover"))
        if config.getoption("world_size"):
            specs = [s for s in specs if s.world_size == config.getoption("world_size")]
        specs.sort(key=lambda s: s.world_size)  # each pool starts once
        metafunc.parametrize("cell", specs, ids=[s.cell_id for s in specs])


def test_cell(cell, run_cell):
    expect_pass(run_cell(cell, reuse=True))
