"""The import rules of the package: the import-linter contracts of pyproject.toml hold, every
module of metatransfer/ sits in a layer, and no import cycle exists, counting the imports
inside functions (which `import` at call time and hide an edge from a reader of the module head)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "metatransfer"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path], root: str = PACKAGE.name) -> dict[str, set[str]]:
    """importer -> imported modules of the package, from every import statement anywhere in a file.

    `from a import b` counts as an import of `a.b` when that is a module, else of `a`; an
    imported name that is no module of the package resolves to its nearest enclosing one.
    """

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, up level-1 packages
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
                targets = submodules + ([source] if len(submodules) < len(node.names) else [])
            else:
                continue
            for target in targets:
                if target == root or target.startswith(root + "."):
                    resolved = resolve(target)
                    if resolved and resolved != module:
                        graph[module].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    """The checker itself: a cycle closed only by an in-function import is found."""
    pkg = tmp_path / "metatransfer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from metatransfer.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from metatransfer import a\n    return a\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(module_files(pkg))
    assert graph["metatransfer.b"] == {"metatransfer.a"} and graph["metatransfer.c"] == {"metatransfer.a"}
    assert cycles(graph) == [["metatransfer.a", "metatransfer.b"]]


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph(module_files())
    assert len(graph) > 50  # the whole package was read
    found = cycles(graph)
    detail = "; ".join(" <-> ".join(c) + ": " + ", ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
                       for c in found)
    assert found == [], f"import cycles (imports inside functions count): {detail}"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_module_of_the_package_is_in_a_layer() -> None:
    (layers,) = [c["layers"] for c in _contracts() if c["name"] == "metatransfer layers"]
    placed = {name.strip().strip("()") for layer in layers for name in layer.replace("|", ":").split(":")}
    top_level = {".".join(m.split(".")[:2]) for m in module_files() if m.count(".") >= 1}
    assert sorted(top_level - placed) == [], "modules in no layer of [tool.importlinter]: add each to one"
    assert sorted(placed - top_level) == [], "layers naming modules that do not exist"


def test_import_contracts_are_kept() -> None:
    """`lint-imports` on pyproject.toml's contracts: layers, flows -> tasks -> library, no Prefect
    in the library, stages independent of each other."""
    assert {c["name"] for c in _contracts()} >= {"metatransfer layers", "the library has no Prefect import",
                                                 "stages import the library, not each other"}
    # A subprocess: lint_imports reconfigures logging (dictConfig), which would silence the
    # loggers of every test after this one.
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command())", "--no-cache", str(ROOT / "pyproject.toml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in run.stdout, run.stdout + run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
