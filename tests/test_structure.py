"""The shape of cifar_core, checked statically: one home per concern, layering, sizes.

Each check reads the source with ``ast`` (nothing is imported), so a change that breaks a
rule fails here with the file and line, before any review.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "cifar_core"
MODULES = {path.stem: path for path in sorted(CORE.glob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
#: File names of the storage layout: spelled out in storage.py only.
LAYOUT_NAMES = {"trial.json", "state.json", "model.keras", "settings.json", "sweep.json",
                "metrics.jsonl", "evaluation.json", "provenance.json", "mlflow.db"}


def imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node.lineno))
            if node.module == "cifar_core":
                found += [(f"cifar_core.{alias.name}", node.lineno) for alias in node.names]
    return found


def calls(tree: ast.AST, dotted: str) -> list[int]:
    """Lines calling ``a.b(...)`` where ``dotted`` is ``"a.b"``."""
    owner, name = dotted.rsplit(".", 1)
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == name and isinstance(node.func.value, ast.Name)
            and node.func.value.id == owner]


def test_no_import_circle_and_core_never_imports_jobs():
    graph = defaultdict(set)
    for name, tree in TREES.items():
        for module, line in imports(tree):
            assert not module.startswith("jobs"), f"{name}.py:{line} imports {module}"
            parts = module.split(".")
            if parts[0] == "cifar_core" and len(parts) > 1 and parts[1] in MODULES \
                    and parts[1] != name:
                graph[name].add(parts[1])

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            assert nxt not in path, "import circle: " + " -> ".join(path + [nxt])
            visit(nxt, path + [nxt])

    for name in MODULES:
        visit(name, [name])


@pytest.mark.parametrize("module, forbidden", [("models", "ray"), ("ladder", "ray"),
                                               ("ladder", "tensorflow"), ("settings", "ray"),
                                               ("plan", "ray"), ("records", "ray"),
                                               ("keras_archive", "tensorflow"),
                                               ("keras_archive", "tf_keras"),
                                               ("keras_archive", "ray")])
def test_layering(module, forbidden):
    bad = [line for name, line in imports(TREES[module]) if name.split(".")[0] == forbidden]
    assert not bad, f"{module}.py imports {forbidden} at lines {bad}"


def test_only_storage_talks_to_the_object_store():
    for name, tree in TREES.items():
        if name != "storage":
            bad = [(m, line) for m, line in imports(tree)
                   if m.split(".")[0] in ("boto3", "botocore")]
            assert not bad, f"{name}.py imports {bad}"


def test_one_image_decoder_and_one_ray_connect():
    for name, tree in TREES.items():
        if name != "images":
            assert not calls(tree, "Image.open"), f"{name}.py opens images itself"
        if name != "ray_glue":
            assert not calls(tree, "ray.init"), f"{name}.py starts Ray itself"


def test_layout_names_live_in_storage():
    for name, tree in TREES.items():
        if name == "storage":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES:
                raise AssertionError(f"{name}.py:{node.lineno} spells {node.value!r}; use "
                                     "the name from storage.py")


def test_module_and_function_sizes():
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        assert lines <= 500, f"{name}.py has {lines} lines (at most 500)"
        for node in ast.walk(TREES[name]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                assert size <= 80, f"{name}.py:{node.lineno} {node.name} has {size} lines"
