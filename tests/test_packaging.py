"""The DeepSpeed templates ship inside the package: an installed wheel renders cells' configs
from its own copy, and the repository root still shows them as ds_configs/."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from numerics.cell.spec import DS_CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_root_links_to_the_packaged_templates():
    assert (ROOT / "ds_configs").resolve() == DS_CONFIG_DIR, "README points readers at ds_configs/"
    assert DS_CONFIG_DIR.parent == Path(sys.modules["numerics.cell.spec"].__file__).resolve().parent


def test_an_installed_wheel_renders_configs_from_its_own_templates(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ behind
    shutil.copytree(ROOT / "src" / "numerics", source / "src" / "numerics", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("numerics/cell/ds_configs/")}
        archive.extractall(tmp_path / "site")
        assert "numerics/show/costs.json" in archive.namelist(), "shards balance by it (numerics.show.shard)"
    assert shipped == {f"numerics/cell/ds_configs/{path.name}" for path in DS_CONFIG_DIR.glob("*.json")}

    script = ("from numerics.cell.spec import DS_CONFIG_DIR, RunSpec\n"
              "assert RunSpec(zero_stage=3, dtype='fp16').ds_config()['zero_optimization']['stage'] == 3\n"
              "print(DS_CONFIG_DIR)")
    installed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip() == str(tmp_path / "site" / "numerics" / "cell" / "ds_configs"), \
        f"the installed copy read templates from {installed.stdout.strip()}, not its own"
