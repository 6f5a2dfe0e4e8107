"""The layout of federation/: five sub-packages layered one way (wire <- aggregation <- publishing <- runtime <- demo),
no import cycle between modules, and `import federation` that loads nothing (the base install has no torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from fedllm import federation

ROOT = Path(federation.__file__).parent
LAYERS = [f"fedllm.federation.{layer}" for layer in ("wire", "aggregation", "publishing", "runtime", "demo")]


def _imports(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the federation modules it imports (TYPE_CHECKING blocks left out; with `top_level_only`, imports
    inside functions and classes too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = "fedllm." + ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        found = graph.setdefault(name, set())

        def visit(node: ast.AST, top: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)) and (top or not top_level_only):
                    if isinstance(child, ast.Import):
                        names = [a.name for a in child.names]
                    else:
                        names = [child.module or ""] + [f"{child.module}.{a.name}" for a in child.names]
                    found.update(n for n in names if n.startswith("fedllm.federation."))
                visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))

        visit(ast.parse(path.read_text()), True)
    return {m: {n for n in deps if n in graph and n != m} for m, deps in graph.items()}


def _layer(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + "."))


def test_every_module_is_in_a_sub_package_and_imports_only_its_own_layer_or_lower():
    graph = _imports(top_level_only=False)
    assert [m for m in graph if m != "fedllm.federation" and not any(m.startswith(layer) for layer in LAYERS)] == []
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m != "fedllm.federation" for d in deps if _layer(d) > _layer(m))
    assert upward == []


def test_no_import_cycle_between_modules():
    graph = _imports(top_level_only=True)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return [*path, module, dep]
            if dep not in state and (found := cycle_from(dep, [*path, module])):
                return found
        state[module] = 2
        return None

    cycles = [c for m in sorted(graph) if m not in state and (c := cycle_from(m, []))]
    assert cycles == []


def test_import_federation_loads_no_submodule_torch_or_zmq():
    code = ("import sys, fedllm.federation; print(sorted(m for m in sys.modules if m.startswith('fedllm.federation.')"
            " or m in ('torch', 'zmq')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
