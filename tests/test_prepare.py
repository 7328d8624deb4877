"""Building DeepSpeed's CPU ops: a build killed midway must not leave every later load waiting,
the processor is described once, not twice per op in every rank, and a venv's ops stay in it."""
import os
import sys

import cpuinfo

from numerics.run.prepare import own_extensions_dir, remember_cpu_info, sole_builder, without_debug_info


def test_a_dead_builds_torch_lock_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with sole_builder("fused_adam"):
        pass  # creates the build directory, as torch's own build does
    [build_dir] = [p for p in tmp_path.rglob("fused_adam") if p.is_dir()]
    (build_dir / "lock").touch()  # what torch's FileBaton leaves when its holder is killed
    with sole_builder("fused_adam"):
        assert not (build_dir / "lock").exists()


def test_ops_compile_without_debug_information(monkeypatch):
    """DeepSpeed's CPU builders pass ``-g``, a third of each cold build, which changes no code."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder

    builder = FusedAdamBuilder()
    assert "-g" in builder.cxx_args()
    without_debug_info(builder)
    flags = builder.cxx_args()
    assert "-g" not in flags and "-O3" in flags, flags


def test_the_processor_is_described_once_and_read_back_after(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    asked = []

    def described() -> dict:  # py-cpuinfo's answer, which costs a subprocess (1.2 s) per call
        asked.append(1)
        return {"arch": "X86_64", "flags": ["avx2", "fma"]}

    monkeypatch.setattr(cpuinfo, "get_cpu_info", described)
    remember_cpu_info()
    assert cpuinfo.get_cpu_info() == cpuinfo.get_cpu_info() == described() and len(asked) == 2
    monkeypatch.setattr(cpuinfo, "get_cpu_info", described)  # the next rank: a fresh module, the same file
    remember_cpu_info()
    assert cpuinfo.get_cpu_info()["flags"] == ["avx2", "fma"] and len(asked) == 2, "the next rank asked py-cpuinfo again"


def without_extensions_dir(monkeypatch) -> None:
    """A private copy of the environment: what ``own_extensions_dir`` sets must not reach the rest of
    the session (a leaked directory made every later rank of the worker rebuild the ops there)."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"})


def test_ops_are_built_inside_the_venv_unless_a_directory_is_set(tmp_path, monkeypatch):
    without_extensions_dir(monkeypatch)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert own_extensions_dir() == str(tmp_path / "venv" / "torch_extensions") == os.environ["TORCH_EXTENSIONS_DIR"]
    os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "overlay")  # a version overlay's own directory
    assert own_extensions_dir() == str(tmp_path / "overlay")


def test_outside_a_venv_torchs_default_directory_stays(monkeypatch):
    without_extensions_dir(monkeypatch)
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    assert own_extensions_dir() is None and "TORCH_EXTENSIONS_DIR" not in os.environ
