"""models/ has no import circle: every import between models/ modules, at any depth in the file (function-level
imports included), read with ast, forms an acyclic graph; and each module imports on its own."""

from __future__ import annotations

import ast
import importlib
import os

import pytest

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
MODULES = sorted(f[:-3] for f in os.listdir(MODELS_DIR) if f.endswith(".py") and f != "__init__.py")


def _models_imports(name: str) -> set[str]:
    """The models/ modules that models/<name>.py imports anywhere in the file (TYPE_CHECKING blocks included)."""
    with open(os.path.join(MODELS_DIR, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from models import x` imports the module models.x; `from models.x import y` imports models.x.
            targets = [f"{node.module}.{a.name}" for a in node.names] if node.module == "models" else [node.module]
        else:
            continue
        found |= {t.split(".")[1] for t in targets if t.startswith("models.") and t.split(".")[1] in MODULES}
    return found - {name}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # 'visiting' on the current path, 'done' when fully explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "visiting"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "visiting":
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_models_import_graph_has_no_cycle() -> None:
    graph = {name: _models_imports(name) for name in MODULES}
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))
    # The layering the docstrings describe: the load dispatch on top, the report layer below, the key maps lowest.
    assert "loading" not in set().union(*(graph[m] for m in MODULES if m not in ("loading", "blip_cir")))
    assert graph["hf_keys"] == set() and "hf_blip" not in graph["checkpoint"]


def test_cycle_finder_sees_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", MODULES)
def test_each_models_module_imports(name: str) -> None:
    importlib.import_module(f"models.{name}")
