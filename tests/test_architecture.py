"""foldin's modules import one way: cli -> evaluation -> state -> runners / api -> engine -> methods /
io -> data -> errors, and no module imports itself back through others. Read from the source
(every `import` statement, function-level ones included), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
# a module may import modules of its own layer's package or of a lower layer
LAYERS = [
    ("foldin.errors", "foldin.progress"),
    ("foldin.data",),
    ("foldin.io", "foldin.methods", "foldin.layers"),
    ("foldin.engine",),
    ("foldin.runners", "foldin.api"),
    ("foldin.state",),
    ("foldin.evaluation",),
    ("foldin.cli",),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """foldin modules that `path` imports (a `from package import name` counts the submodule if it is one)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("foldin"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("foldin"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found & modules


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (SRC / "foldin").rglob("*.py")}
    return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None  # the package itself (foldin/__init__.py): the public API, on top


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                pytest.fail(
                    "import cycle: " + " -> ".join([*path[path.index(dep) :], dep])
                    if dep in path
                    else f"import cycle through {dep}"
                )
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_dependencies_run_one_way():
    wrong = []
    for module, deps in _graph().items():
        rank = _layer(module)
        if rank is None:
            continue
        for dep in deps:
            dep_rank = _layer(dep)
            if dep_rank is None or dep_rank > rank:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_is_in_a_layer():
    assert [m for m in _graph() if _layer(m) is None] == ["foldin"]
