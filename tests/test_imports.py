"""The package's imports: no cycles, an import inside a function only where it is deliberately
lazy (and says so), and a CLI that starts without torch or transformers.

Read from the source with `ast`, so an import hidden inside a function counts as much as one
at the top of a module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batchscore"
LAZY = "lazy"  # the word an in-function import's comment holds: `# lazy: <why it is not at the top>`


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module of `package` (subpackages included)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The package's modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    found = []
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:  # `from batchscore.reporting import drift`: the module
            found.append(f"{base}.{alias.name}")
        elif base in modules:  # `from batchscore.reporting.drift import against`: a name of the module
            found.append(base)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, str]]:
    """{module: {imported module: where (file:line)}} of every import in the package, those
    inside functions included."""
    modules = module_names(package)
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(module, path, node, modules):
                    if target != module:
                        graph[module].setdefault(target, f"{path.relative_to(package.parent)}:{node.lineno}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated last) per strongly connected component
    of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the package is small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, dict[str, str]], component: set[str]) -> list[str]:
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth first from `start` inside the component, back to `start`
        v = todo.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return paths[v] + [start]
            if w in component and w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(graph: dict[str, dict[str, str]], cycle: list[str]) -> str:
    return "\n".join(f"  {a} imports {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_the_package_imports_form_no_cycle():
    graph = import_graph()
    assert "batchscore.checkpoints.models" in graph and "batchscore.checkpoints.timm_models" in graph["batchscore.checkpoints.models"]
    found = cycles(graph)
    assert not found, "import cycle(s), imports inside functions included:\n" + "\n\n".join(
        describe(graph, c) for c in found)


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    """The check itself: an import inside a function closes a cycle as much as a top-level one."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from . import c  # lazy: a test\n")
    (package / "c.py").write_text("def g():\n    from pkg.a import x  # lazy: a test\n")
    graph = import_graph(package)
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert "pkg.c imports pkg.a (pkg/c.py:2)" in describe(graph, cycles(graph)[0])


def _comments(path: Path) -> dict[int, str]:
    """{line: comment text} of a source file."""
    with open(path, "rb") as f:
        return {t.start[0]: t.string for t in tokenize.tokenize(f.readline) if t.type == tokenize.COMMENT}


def unexplained_lazy_imports(package: Path = PACKAGE) -> list[str]:
    """The imports inside functions without a `lazy` comment: on the statement's lines, on the
    line above, or on those of the run of import statements it closes (one comment may
    explain `import torch` and the `from torchvision ...` right below it)."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        comments = _comments(path)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for body in _bodies(function):
                run: list[ast.stmt] = []  # consecutive import statements
                for stmt in body:
                    if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        run = []
                        continue
                    if run and stmt.lineno != run[-1].end_lineno + 1:
                        run = []
                    run.append(stmt)
                    lines = range(run[0].lineno - 1, stmt.end_lineno + 1)
                    if not any(LAZY in comments.get(n, "") for n in lines):
                        bad.append(f"{path.relative_to(package.parent)}:{stmt.lineno}: {ast.unparse(stmt)}")
    return sorted(set(bad))


def _bodies(function: ast.AST):
    """Every statement list inside `function` (its body, those of its ifs, trys, withs, ...),
    not those of the functions nested in it (they are walked on their own)."""
    todo = [function]
    while todo:
        node = todo.pop()
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            value = getattr(node, field, None)
            if isinstance(value, list):
                stmts = [s for s in value if isinstance(s, ast.stmt)]
                if stmts:
                    yield stmts
                todo.extend(s for s in value if isinstance(s, (ast.stmt, ast.excepthandler, ast.match_case))
                            and not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))


def test_every_import_inside_a_function_says_why_it_is_lazy():
    """An import belongs at the top of its module unless it is deliberately lazy (torch,
    transformers, timm, matplotlib, Ray's stages, keeping `import batchscore` light); then a
    `# lazy: ...` comment says why."""
    bad = unexplained_lazy_imports()
    assert not bad, ("imports inside functions without a `# lazy: <why>` comment (move them to the top of the "
                     "module, or say why they must wait):\n  " + "\n  ".join(bad))


def test_the_lazy_check_finds_an_unexplained_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text(
        "import json\n\n\n"
        "def f():\n    # lazy: torch takes a second\n    import torch\n    from torchvision import io\n\n"
        "    import shutil\n\n\n"
        "def g():\n    if True:\n        import yaml  # lazy: only for a job file\n\n        from os import path\n")
    assert unexplained_lazy_imports(package) == ["pkg/m.py:16: from os import path", "pkg/m.py:9: import shutil"]


@pytest.mark.parametrize("module", ["batchscore.cli", "batchscore.outputs.write", "batchscore.inputs.listing", "batchscore.reporting.report"])
def test_importing_the_cli_and_its_light_stages_loads_no_torch_or_transformers(module):
    """`batchscore validate` and `inspect` start in about a second: importing what they need
    must not import torch or transformers (seconds), nor Ray Data (imported by `score` only)."""
    heavy = ("torch", "torchvision", "transformers", "timm", "ray.data")
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import {module} loaded {proc.stdout.strip()}"


@pytest.mark.parametrize("module", ["batchscore.cli", "batchscore.plan"])
def test_validate_and_the_plan_do_without_ray(module):
    """`validate` (the CLI) and the plan's checks need no cluster, so they do not import Ray
    (~0.3 s); `score` imports it when it starts Ray."""
    code = f"import sys, {module}; print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", f"import {module} imported ray"
