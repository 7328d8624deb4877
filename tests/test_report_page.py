"""report.html: written beside results.json, re-rendered and merged by ``numerics report``,
and, opened in headless Chromium, it shows the failing cell and its curves."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_trace, result

from numerics.cell.spec import RunSpec
from numerics.judge.invariants import Verdict
from numerics.show import report, results
from numerics.show.cli import main

FAILING = RunSpec(zero_stage=2, dtype="bf16", comm_dtype="fp16")
PASSING = RunSpec(zero_stage=1)


@pytest.fixture
def report_dir(tmp_path):
    """A run with one passing cell and one whose loss spikes at step 9 (its reference does not)."""
    passing = result(PASSING, Verdict("finite", "pass"))
    failing = result(FAILING, Verdict("no_spike", "fail", f"[{FAILING.cell_id}] at step 9: loss 9.0 vs 3.9", 9))
    failing.outcome.trace = make_trace(losses=[*np.linspace(4.1, 3.9, 9), 9.0, *np.linspace(3.9, 3.8, 6)], spec=FAILING)
    failing.reference = passing.reference = make_trace()
    report.write_report([passing, failing], tmp_path / "run")
    return tmp_path / "run"


def test_page_holds_the_grid_the_failing_cell_and_its_curves(report_dir):
    page = (report_dir / "report.html").read_text()
    assert page.count('class="box"') == 2
    assert f'id="cell-{FAILING.cell_id}"' in page and "at step 9" in page
    assert page.count("data:image/png;base64,") == 2  # the failing cell open, the passing one on demand
    assert "http://" not in page and "https://" not in page  # self-contained: no network
    data = json.loads((report_dir / "results.json").read_text())
    assert data["schema"] == results.SCHEMA and data["kind"] == "matrix"
    failing = next(c for c in data["cells"] if c["cell"] == FAILING.cell_id)
    assert failing["first_bad_step"] == 9 and len(failing["reference"]["loss"]) == 16


def test_report_rerenders_and_checks(report_dir, capsys):
    (report_dir / "report.html").unlink()
    assert main(["report", str(report_dir)]) == 0
    assert (report_dir / "report.html").exists()
    assert main(["report", str(report_dir), "--check", "--summary-md"]) == 1
    assert f"| `{FAILING.cell_id}` | no_spike | 9 |" in capsys.readouterr().out


def test_merge_joins_shards_and_refuses_a_directory_named_twice(report_dir, tmp_path):
    other = result(RunSpec(zero_stage=3), Verdict("finite", "pass"))
    report.write_report([other], tmp_path / "shard2")
    assert main(["report", "--merge", str(report_dir), str(tmp_path / "shard2"), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert len(merged["cells"]) == 3 and merged["summary"].startswith("2 passed, 1 failed")
    assert main(["report", "--merge", str(report_dir), str(report_dir), "--out", str(tmp_path / "twice")]) == 2


def test_report_of_a_directory_without_results_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no results.json" in capsys.readouterr().out


def test_chromium_shows_the_failing_cell_and_its_plot(report_dir, tmp_path):
    """The page as a person sees it: the DOM Chromium built holds the failing cell's section
    with its curves decoded as an image, and the screenshot is not blank."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is missing: ci/setup.sh installs Debian's chromium package"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1200"]
    url = (report_dir / "report.html").as_uri()
    # Each curve's decoded size, written into the DOM, so the dump shows the image really loaded.
    probe = "file://" + str(tmp_path / "probe.html")
    (tmp_path / "probe.html").write_text(f"<iframe id=f src='{url}' onload=\"document.body.dataset.sizes="
                                         "[...this.contentDocument.images].map(i=>i.naturalWidth).join(',')\"></iframe>")
    dom = subprocess.run([*flags, "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom", probe],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-sizes="720,720"' in dom, dom[-2000:]
    page_dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert f'id="cell-{FAILING.cell_id}"' in page_dom and "no_spike" in page_dom
    screenshot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (1200, 1400)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50  # text, colours, curves: not blank


FAKE_CELLS = '''
import sys
sys.path.insert(0, {tests!r})
import pytest
from conftest import result
from numerics.judge.invariants import Verdict
from numerics.show.plugin import RESULTS_KEY
from numerics.cell.spec import RunSpec

@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cell(stage, request):
    request.config.stash[RESULTS_KEY].append(result(RunSpec(zero_stage=stage), Verdict("finite", "pass")))
'''


def test_xdist_workers_write_their_own_reports_and_the_controller_merges_them(tmp_path):
    """Two workers, four cells: every cell in the merged report, none lost to a worker that wrote last.
    Started as from inside an xdist worker (``PYTEST_XDIST_WORKER`` inherited), it still merges."""
    (tmp_path / "test_fake_cells.py").write_text(FAKE_CELLS.format(tests=str(Path(__file__).parent)))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                           "--numerics-report", str(tmp_path / "report"), str(tmp_path / "test_fake_cells.py")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTEST_XDIST_WORKER": "gw7"})
    assert done.returncode == 0, done.stdout[-3000:]
    merged = json.loads((tmp_path / "report" / "results.json").read_text())
    assert sorted(c["cell"] for c in merged["cells"]) == [f"zero{s}-fp32-ws2" for s in range(4)]
    assert len(list((tmp_path / "report" / "workers").glob("*/results.json"))) == 2
    assert len(merged["tests"]) == 4 and (tmp_path / "report" / "report.html").exists()
