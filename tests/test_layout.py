"""The layering drawn from the imports (parsed with `ast`, so imports inside functions count too): every import of ours
goes through the one `fedllm` namespace that pyproject.toml maps, the test harness has one home (`testing/`), the test
bed stands apart from the product, and the base (`fedllm.core`) imports nothing above it."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from fedllm.testing.factories import REPO

PRODUCT = ("fedllm.appliance", "fedllm.train", "fedllm.serve", "fedllm.federation", "fedllm.ui")
BASE = "fedllm.core"  # the layer every package may import, the test bed included
FOLDERS = ("appliance", "core", "train", "serve", "federation", "ui", "testbed", "testing")  # each is fedllm.<folder>


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved against `package`, by default the one
    its place in the checkout gives), at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offenders(folder: str, allowed=lambda m: False, forbidden: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """{file: [modules it imports from `forbidden` that `allowed` does not let through]} for the .py files of `folder`."""
    bad: dict[str, list[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        hits = sorted(m for m in imported_modules(path) if any(within(m, p) for p in forbidden) and not allowed(m))
        if hits:
            bad[str(path.relative_to(REPO))] = hits
    return bad


@pytest.mark.parametrize("folder", ["bench", "testbed", "testing"])
def test_bench_testbed_and_the_harness_never_import_the_tests(folder):
    assert offenders(folder, forbidden=("tests",)) == {}


def test_the_testbed_imports_no_product_package_only_the_base():
    assert offenders("testbed", allowed=lambda m: within(m, BASE), forbidden=PRODUCT) == {}


def test_the_base_imports_nothing_above_it():
    assert offenders("core", allowed=lambda m: within(m, BASE), forbidden=("fedllm",)) == {}


@pytest.mark.parametrize("folder", [*FOLDERS, "tests", "bench", "deploy"])
def test_every_import_of_ours_goes_through_the_fedllm_namespace(folder):
    """A bare `import serve` would load a second copy of a module from the checkout (two registries, two settings)."""
    assert offenders(folder, forbidden=FOLDERS) == {}


def test_pyproject_maps_every_package_folder_under_fedllm():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {f"fedllm.{top}": top for top in FOLDERS}
    folders = {"fedllm." + ".".join(init.parent.relative_to(REPO).parts)
               for top in FOLDERS for init in (REPO / top).rglob("__init__.py")}
    assert set(tool["packages"]) == folders


def test_the_import_parser_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The checks above could not fail if the parser missed the imports a function makes on first use."""
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib\n\ndef f():\n    from tests.factories import x\n    import federation.silo\n"
                     "    importlib.import_module('fedllm.serve.app')\n\nfrom .. import ui\n")
    modules = imported_modules(probe, package="testbed.sub")
    assert {"tests.factories", "federation.silo", "fedllm.serve.app", "testbed.ui"} <= modules
    assert any(within(m, "tests") for m in modules) and not within("testsuite", "tests")
