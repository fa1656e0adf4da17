"""The layout holds: the top of `fedbench/` is the public plugin API, plugins import only that,
only the command line knows a screen, the core never imports a plugin, modules import each other
without cycles, and no file grows past about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fedbench

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "fedbench"
PLUGIN_DIRS = {"fedbench_plugins": ROOT / "plugins", "fedbench_datasets": ROOT / "datasets"}
PARTS = ("engine", "results", "backends", "cli")
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    """Every module of fedbench and of the built-in plugins, by import name."""
    found = {}
    for package, folder in {"fedbench": CORE, **PLUGIN_DIRS}.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path) -> list[str]:
    """Modules a file imports when it runs (anywhere, functions included), leaving out what it
    imports under `if TYPE_CHECKING:`; `from a import b` names a.b when that is a module."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.append(sub if sub in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def test_every_public_name_imports():
    assert "Method" in fedbench.__all__ and "hookimpl" in fedbench.__all__
    for name in fedbench.__all__:
        assert getattr(fedbench, name) is not None, name


def test_the_public_api_is_the_top_level_modules():
    public = {f"fedbench.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__"}
    for name in fedbench.__all__:
        if name != "__version__":
            assert fedbench._PUBLIC[name] in public, name
    for part in PARTS:
        assert (CORE / part / "__init__.py").is_file(), f"fedbench.{part} is a sub-package"


def test_plugins_import_only_the_public_api():
    public = {f"fedbench.{p.stem}" for p in CORE.glob("*.py")} | {"fedbench"}
    for name, path in MODULES.items():
        if name.startswith("fedbench."):
            continue
        for target in runtime_imports(path):
            if target == "fedbench" or target.startswith("fedbench."):
                assert target in public, f"{path.name} imports {target}, not public API"


def test_only_the_command_line_knows_a_screen():
    for name, path in MODULES.items():
        if name == "fedbench.cli" or name.startswith("fedbench.cli."):
            continue
        for target in runtime_imports(path):
            root = target.split(".")[0]
            assert root not in ("rich", "typer"), f"{name} imports {target}"


def test_the_core_never_imports_a_plugin():
    for name, path in MODULES.items():
        if name.startswith("fedbench."):
            for target in runtime_imports(path):
                assert target.split(".")[0] not in PLUGIN_DIRS, f"{name} imports {target}"


def import_graph() -> dict[str, set[str]]:
    return {
        name: {t for t in runtime_imports(path) if t in MODULES and t != name}
        for name, path in MODULES.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_runtime_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "folder", ["fedbench", "plugins", "datasets", "tests", "benchmarks"], ids=str
)
def test_no_file_over_the_line_limit(folder):
    for path in (ROOT / folder).rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"
