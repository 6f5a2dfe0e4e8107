"""The structure of the code, measured from its own imports and definitions (nothing is run).

Prints, for the product packages of the checkout given (default: this one), in Markdown:
- each package: files and lines;
- the imports between packages (the test harness, `testing`, sits above all: it drives the product), the pairs of installed top-level packages that import each other, and every arrow that points up the layers (the base at the bottom, the CLI and
  launcher at the top) or sideways between `train` and `serve`;
- the largest files, classes (lines and methods) and functions, and every function with more than 7 parameters.

It reads both layouts: the base as `core/` (before the `fedllm` namespace) or `core/` (after).

    python bench/structure.py [CHECKOUT] [--top 10]
"""
import argparse
import ast
from collections import Counter
from pathlib import Path

LAYER = {"base": 0, "train": 1, "serve": 1, "federation": 2, "ui": 3, "testbed": 3, "appliance": 4, "testing": 5}
NAMES = ["appliance", "core", "train", "serve", "federation", "ui", "testbed", "testing"]


def package_of(root: Path, path: Path) -> str:
    """The package a file belongs to: `base` for the base, whichever layout."""
    parts = path.relative_to(root).parts
    if parts[0] == "core" or parts[:2] == ("appliance", "core"):
        return "base"
    return parts[0]


def target_package(module: str) -> str | None:
    """The package an absolute import names, in either layout; None when it is not ours."""
    parts = module.split(".")
    if parts[0] == "fedllm":
        parts = parts[1:]
    if not parts or parts[0] not in NAMES:
        return None
    if parts[0] == "core" or parts[:2] == ["appliance", "core"]:
        return "base"
    return parts[0]


def files(root: Path) -> list[Path]:
    return [p for name in NAMES if (root / name).is_dir() for p in sorted((root / name).rglob("*.py"))
            if "__pycache__" not in p.parts]


def measure(root: Path) -> dict:
    lines: Counter[str] = Counter()
    count: Counter[str] = Counter()
    arrows: Counter[tuple[str, str]] = Counter()
    installed: set[tuple[str, str]] = set()  # between top-level import names, the base counted as its folder
    sizes, classes, functions, wide = [], [], [], []
    for path in files(root):
        text = path.read_text()
        pkg = package_of(root, path)
        rel = str(path.relative_to(root))
        n = len(text.splitlines())
        lines[pkg] += n
        count[pkg] += 1
        sizes.append((n, rel))
        tree = ast.parse(text, filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = []
            for name in names:
                target = target_package(name)
                if target and target != pkg:
                    arrows[(pkg, target)] += 1
                top = name.split(".")[1] if name.startswith("fedllm.") else name.split(".")[0]
                if top in NAMES and top != path.relative_to(root).parts[0]:
                    installed.add((path.relative_to(root).parts[0], top))
            if isinstance(node, ast.ClassDef):
                methods = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in node.body)
                classes.append((node.end_lineno - node.lineno + 1, methods, f"{rel}:{node.name}"))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
                params = [p for p in params if p.arg not in ("self", "cls")]
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
                if len(params) > 7:
                    wide.append((len(params), f"{rel}:{node.name}"))
    return {"lines": lines, "count": count, "arrows": arrows, "installed": installed, "sizes": sorted(sizes, reverse=True),
            "classes": sorted(classes, reverse=True), "functions": sorted(functions, reverse=True),
            "wide": sorted(wide, reverse=True)}


def direction(src: str, dst: str) -> str:
    if LAYER[dst] > LAYER[src]:
        return "UP"
    if LAYER[dst] == LAYER[src]:
        return "SIDEWAYS"
    return ""


def report(m: dict, top: int) -> str:
    out = ["| package | files | lines |", "| --- | ---: | ---: |"]
    out += [f"| {p} | {m['count'][p]} | {m['lines'][p]} |" for p in sorted(m["count"], key=lambda p: LAYER.get(p, 9))]
    out += ["", f"Total: {sum(m['count'].values())} files, {sum(m['lines'].values())} lines.", "",
            "| import | count | direction |", "| --- | ---: | --- |"]
    out += [f"| {s} -> {d} | {n} | {direction(s, d)} |" for (s, d), n in sorted(m["arrows"].items())]
    up = [k for k in m["arrows"] if direction(*k)]
    both = sorted({tuple(sorted(k)) for k in m["installed"] if k[::-1] in m["installed"]})
    out += ["", f"Top-level packages that import each other: {len(both)} "
                f"({', '.join(f'{a}<->{b}' for a, b in both) or 'none'})."]
    out += [f"Arrows up or sideways: {len(up)} ({', '.join(f'{s}->{d}' for s, d in sorted(up)) or 'none'}).", ""]
    out += [f"Largest files: " + ", ".join(f"{r} {n}" for n, r in m["sizes"][:top])]
    out += [f"Largest classes (lines, methods): " + ", ".join(f"{r} {n}/{k}" for n, k, r in m["classes"][:top])]
    out += [f"Largest functions: " + ", ".join(f"{r} {n}" for n, r in m["functions"][:top])]
    out += [f"Functions over 7 parameters ({len(m['wide'])}): " + ", ".join(f"{r} {n}" for n, r in m["wide"])]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--top", type=int, default=10, help="how many of the largest files, classes, functions")
    args = parser.parse_args()
    print(report(measure(Path(args.checkout)), args.top))


if __name__ == "__main__":
    main()
