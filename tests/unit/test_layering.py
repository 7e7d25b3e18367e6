"""The layering rules of DESIGN.md, read from the source with ``ast`` (no imports):

    pipelines  ->  models, data
    models     ->  keras, keras_hub          (never tensorflow, mlflow, pipelines, data)
    data       ->  tensorflow, tfds, numpy   (never models, mlflow, pipelines)

and: no task imports another task; only ``pipelines/tracking.py``, ``pipelines/serving/``
and ``pipelines/reports/`` import MLflow; module-level imports have no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "data", "pipelines")
MLFLOW_ALLOWED = ("pipelines/tracking.py", "pipelines/serving/", "pipelines/reports/")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _imports(path: Path, module_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) of every import in a file; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if module_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.append((name, node.lineno))
            out += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


SOURCES = _sources()


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("models", {"tensorflow", "tensorflow_datasets", "mlflow", "pipelines", "data"}),
        ("data", {"models", "mlflow", "pipelines"}),
    ],
)
def test_lower_layers_do_not_import_upwards(package, forbidden):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in SOURCES.items()
        if _top(module) == package
        for name, line in _imports(path)
        if _top(name) in forbidden
    ]
    assert not bad, "\n".join(bad)


def test_no_task_imports_another_task():
    bad = []
    for module, path in SOURCES.items():
        if not module.startswith("pipelines.tasks.") or module == "pipelines.tasks.base":
            continue
        for name, line in _imports(path):
            if name.startswith("pipelines.tasks") and not name.startswith("pipelines.tasks.base"):
                if name not in ("pipelines.tasks",) and not name.startswith(module):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_only_tracking_serving_and_reports_import_mlflow():
    bad = []
    for path in SOURCES.values():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(MLFLOW_ALLOWED):
            continue
        bad += [
            f"{rel}:{line} imports {name}"
            for name, line in _imports(path)
            if _top(name) == "mlflow"
        ]
    assert not bad, "\n".join(bad)


def test_module_level_imports_have_no_cycles():
    graph: dict[str, set[str]] = {}
    for module, path in SOURCES.items():
        deps = set()
        for name, _ in _imports(path, module_level_only=True):
            # "from pipelines.tasks.base import Task" names a module or a symbol in one
            while name and name not in SOURCES:
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_mlflow_folder_is_not_a_python_package():
    assert not (ROOT / "mlflow" / "__init__.py").exists()
