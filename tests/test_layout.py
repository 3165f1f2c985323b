"""The package's layout: library below, the command line and the HTTP layer on top.

Read from the source with :mod:`ast` (nothing is imported except in the environment check):
no library module imports ``paradapt.cli`` (not even inside a function); only the HTTP layer
and the command line import fastapi/uvicorn; the module-level import graph has no cycle; and
importing the library changes no environment variable (only ``paradapt.cli.main`` may).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paradapt

#: The HTTP layer: the modules (besides paradapt.cli) allowed to import a web framework. The
#: HTTP layer is the FastAPI app, its request/response schemas, its handlers and its middleware.
HTTP_LAYER = (
    "paradapt.serve.app",
    "paradapt.serve.protocol",
    "paradapt.serve.completions",
    "paradapt.serve.extras",
    "paradapt.serve.security",
    "paradapt.cluster.ray_serve",  # the cluster's HTTP entry (Ray Serve ingress relaying to the apps)
)
HTTP_PACKAGES = ("fastapi", "uvicorn", "starlette")
CLI = "paradapt.cli"
#: Module-level import cycles known today, each as a sorted tuple of module names (none).
KNOWN_CYCLES: list[tuple[str, ...]] = []

SRC = Path(paradapt.__file__).resolve().parent.parent


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted((SRC / "paradapt").rglob("*.py"))}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names (``from . import x``: ``x`` too, when a submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _all_imports(module: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import statement, function-level ones included."""
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(module, node):
                yield node.lineno, target


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _load_time_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module loads: not in functions, not under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _load_time_imports(node.body)
            yield from _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _load_time_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _load_time_imports(node.body)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules loading it loads first (an imported submodule's parent
    packages too, unless they are the importer's own parents, which are already loading)."""
    graph = {}
    for module, path in MODULES.items():
        own_parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
        edges = set()
        for node in _load_time_imports(ast.parse(path.read_text()).body):
            for target in _targets(module, node):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    loaded = ".".join(parts[:i])
                    if loaded in MODULES and loaded != module and loaded not in own_parents:
                        edges.add(loaded)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_scan_sees_the_package():
    assert {"paradapt", "paradapt.loading", f"{CLI}.serve", "paradapt.twin.sim"} <= set(MODULES)
    # relative imports resolve: train/run.py's function-level ``from ..loading import ...``
    assert "paradapt.loading" in {t for _, t in _all_imports("paradapt.train.run")}
    assert "paradapt.serve.core" in _import_graph()["paradapt.twin.sim"]


def test_no_library_module_imports_the_command_line():
    bad = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {target}"
        for m in MODULES
        if not _in(m, CLI)
        for line, target in _all_imports(m)
        if _in(target, CLI)
    ]
    assert not bad, "the library must not import paradapt.cli:\n" + "\n".join(bad)


def test_only_the_http_layer_imports_the_web_framework():
    """Library code neither imports fastapi/uvicorn nor the HTTP layer itself (an arrow up)."""
    bad = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {target}"
        for m in MODULES
        if not _in(m, CLI) and m not in HTTP_LAYER
        for line, target in _all_imports(m)
        if any(_in(target, p) for p in (*HTTP_PACKAGES, *HTTP_LAYER))
    ]
    assert not bad, (
        f"only {HTTP_LAYER} and {CLI} may import {HTTP_PACKAGES} or the HTTP layer:\n" + "\n".join(bad)
    )


def test_module_level_imports_have_no_cycle():
    assert _cycles(_import_graph()) == KNOWN_CYCLES


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]


def _run_between_snapshots(setup: str, imports: str) -> dict:
    script = (
        "import json, os\n"
        f"{setup}\n"
        "before = dict(os.environ)\n"
        f"{imports}\n"
        "after = dict(os.environ)\n"
        "changed = {k: [before.get(k), after.get(k)] for k in before.keys() | after.keys()"
        " if before.get(k) != after.get(k)}\n"
        "print(json.dumps(changed))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in _OFFLINE}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# the variables the command line sets: absent here, so that setting one would show
_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


def test_import_paradapt_changes_no_environment_variable():
    assert _run_between_snapshots("", "import paradapt") == {}


def test_importing_the_library_changes_no_environment_variable():
    """Every library module (the command line and the HTTP layer aside). torch and transformers
    load first: what they do to the environment on import is theirs, not paradapt's."""
    library = sorted(m for m in MODULES if not _in(m, CLI) and m not in HTTP_LAYER)
    imports = "\n".join(f"import {m}" for m in library)
    assert _run_between_snapshots("import torch, transformers", imports) == {}
