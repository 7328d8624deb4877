"""Building DeepSpeed's CPU ops: a build killed midway must not leave every later load waiting."""
from numerics.run.prepare import sole_builder


def test_a_dead_builds_torch_lock_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with sole_builder("fused_adam"):
        pass  # creates the build directory, as torch's own build does
    [build_dir] = [p for p in tmp_path.rglob("fused_adam") if p.is_dir()]
    (build_dir / "lock").touch()  # what torch's FileBaton leaves when its holder is killed
    with sole_builder("fused_adam"):
        assert not (build_dir / "lock").exists()
