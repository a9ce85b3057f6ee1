"""Data flows one way: pipeline <- trainer <- flows, and bench only uses them. Checked on every
module's imports (top level and inside functions), read with `ast`, so no import runs; the same
reading keeps every function of the code short enough to read on one screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("pipeline", "trainer", "flows")

# package -> top-level packages it must never import
FORBIDDEN = {
    "pipeline": {"trainer", "flows", "bench", "prefect", "prefect_dask"},
    "trainer": {"flows", "bench", "prefect", "prefect_dask"},
    "flows": {"bench"},
}
# package -> modules of the other libraries it must never import: the trainer reads versions the flows
# built; building, planning and committing them stays with the flows.
FORBIDDEN_MODULES = {
    "trainer": {"pipeline.build", "pipeline.plan", "pipeline.batch", "pipeline.commit"},
}
CODE = (*LIBRARIES, "bench")  # every folder of code outside tests/
MAX_FUNCTION_LINES = 80
# Functions still longer than MAX_FUNCTION_LINES: being split in the trainer branch.
LONG_FUNCTIONS_BEING_SPLIT: set[str] = set()  # none left


def imported_modules(path: Path, *, type_checking: bool = False) -> set[str]:
    """Every absolute module name `path` imports (relative imports resolve within its package); with
    `type_checking`, those imported only for annotations (`if TYPE_CHECKING:`) too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(ROOT).with_suffix("").parts[:-1] if path.is_relative_to(ROOT) else ()
    names: set[str] = set()
    for node in (ast.walk(tree) if type_checking else _walk_run_time(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def imported_names(path: Path) -> set[str]:
    """`imported_modules`, plus `X.y` for every `from X import y`: `y` may be the module `X.y`."""
    names = imported_modules(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in _walk_run_time(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _walk_run_time(tree: ast.AST):
    """Every node, except inside `if TYPE_CHECKING:` blocks (annotations only; nothing runs there)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_walk_run_time(child)])
            continue
        yield node
        yield from _walk_run_time(node)


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", LIBRARIES)
def test_libraries_import_only_downstream(package):
    bad = []
    for path in _modules(package):
        for name in sorted(imported_modules(path)):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "imports against the direction of flow:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(FORBIDDEN_MODULES))
def test_libraries_leave_building_data_to_the_flows(package):
    bad = []
    for path in _modules(package):
        for name in sorted(imported_names(path)):
            for forbidden in sorted(FORBIDDEN_MODULES[package]):
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "modules this library must leave to the flows:\n" + "\n".join(bad)


def test_the_checker_sees_a_module_imported_from_its_package(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("from pipeline import build\n\ndef f():\n    from pipeline.commit import commit\n")
    assert {"pipeline.build", "pipeline.commit"} <= imported_names(module)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("import os\nif TYPE_CHECKING:\n    import flows.cli\n\n"
                      "def f():\n    from trainer.config import TrainConfig\n    return TrainConfig\n")
    assert imported_modules(module) == {"os", "trainer.config"}
    assert imported_modules(module, type_checking=True) == {"os", "flows.cli", "trainer.config"}


def test_every_library_module_is_checked():
    for package in LIBRARIES:
        assert len(_modules(package)) > 3, f"{package}: no modules found under {ROOT / package}"


@pytest.mark.parametrize("package", ("pipeline", "trainer"))
def test_library_modules_import_each_other_without_cycles(package):
    """No circle, even through imports made only for annotations (`if TYPE_CHECKING:`): a module that
    needs another's types for its own signatures is one concern split in two."""
    graph = {}
    for path in _modules(package):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        graph[name] = {m for m in imported_modules(path, type_checking=True)
                       if m.startswith(f"{package}.") and m != name}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep in graph and dep not in state and (found := cycle_from(dep, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := cycle_from(start, [])):
            pytest.fail(f"import cycle in {package}/: {' -> '.join(found)}")


def long_functions(path: Path, max_lines: int) -> dict[str, int]:
    """`file:Class.function` -> lines, for every function (methods and nested ones too) over `max_lines`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > max_lines:
                    found[f"{where}:{name}"] = lines
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def test_no_function_is_longer_than_a_screen():
    found = {}
    for package in CODE:
        for path in _modules(package):
            found.update(long_functions(path, MAX_FUNCTION_LINES))
    bad = [f"{name}: {lines} lines" for name, lines in sorted(found.items()) if name not in LONG_FUNCTIONS_BEING_SPLIT]
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(bad)


def test_the_length_checker_sees_methods_and_nested_functions(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("def short():\n    pass\n\n\nclass C:\n    def long(self):\n        a = 1\n        b = 2\n"
                      "        def inner():\n            c = 3\n            d = 4\n            return c + d\n"
                      "        return inner() + a + b\n")
    assert long_functions(module, 3) == {"probe.py:C.long": 8, "probe.py:C.long.inner": 4}
