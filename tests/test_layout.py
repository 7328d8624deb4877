"""The package is layered by the stages a cell travels: cell -> judge -> run -> show. A module
imports (at module level or inside a function) only its own layer and the ones before it, and
no modules import each other in a circle. ``versions`` wraps the pipeline at show's level
(only show imports it), except ``versions.compat``, which imports nothing of numerics and
which any layer may use (the drivers do)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "numerics"
LAYERS = {"cell": 0, "judge": 1, "run": 2, "show": 3, "versions": 3}
LEAVES = {"numerics.versions.compat"}  # import no numerics module; importable from anywhere


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The numerics modules ``name`` imports anywhere in its file (``from numerics.x import y``
    counts as numerics.x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: a relative import; spell the layer out"
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                       for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # import numerics.x.y.z: module numerics.x.y
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found - {name}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int | None:
    """A module's rank; None for the top-level package and the subpackages' docstrings."""
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 2 else None


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) is not None))
def test_imports_only_earlier_layers(name):
    later = sorted(target for target in GRAPH[name] if target not in LEAVES
                   and (layer(target) is None or layer(target) > layer(name)))
    assert not later, f"{name} imports a later layer (or the top-level package): {later}"
    if name in LEAVES:
        assert not GRAPH[name], f"{name} must import no numerics module: {sorted(GRAPH[name])}"


def test_no_import_cycles():
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path[path.index(target):] + [target])
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", ["numerics", *(f"numerics.{sub}" for sub in LAYERS)])
def test_each_package_says_what_it_owns(name):
    assert ast.get_docstring(ast.parse(MODULES[name].read_text())), f"{name}/__init__.py needs its docstring"
