"""The code's structure, as docs/architecture.md states it: no two modules import each
other (imports inside functions counted), no function over 80 lines, a method's plan
name spelled in few files (the registry, and the mask mode it shares a name with), and
every import inside a function says why it is lazy."""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Tuple

import networkx as nx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"planc": "planc", "passes": "planc.passes", "kernels": "planc.kernels"}


def _modules() -> Dict[str, str]:
    """module name -> file, for planc and its installed subpackages."""
    out = {}
    for folder, package in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3]
                    name = package + ("." + rel.replace(os.sep, ".") if rel != "__init__" else "")
                    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(dirpath, f)
    return out


def _imports(modules: Dict[str, str]) -> Tuple[nx.DiGraph, List[Tuple[str, int, bool]]]:
    """The import graph (every import, top level or not) and (file, line, says why) of each
    import inside a function."""
    graph, inner = nx.DiGraph(), []
    for name, path in modules.items():
        source = open(path, encoding="utf-8").read()
        lines, tree = source.splitlines(), ast.parse(source)
        graph.add_node(name)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = set()
            for full in _names(node, name, path, modules):
                while full and full not in modules:
                    full = full.rpartition(".")[0]
                if full and full != name:
                    targets.add(full)
            graph.add_edges_from((name, t) for t in targets)
            p = node
            while p in parents and not isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                p = parents[p]
            if p in parents or isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) and targets | _external(node):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    inner.append((f"{path}:{node.lineno}", node.lineno, "#" in here or above.startswith("#")))
    return graph, inner


def _external(node) -> set:
    return {a.name for a in node.names} if isinstance(node, ast.Import) else {node.module or ""}


def _names(node, name: str, path: str, modules) -> List[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def test_no_two_modules_import_each_other():
    graph, _ = _imports(_modules())
    assert graph.number_of_edges() > 100                     # the graph was really read
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, [" -> ".join(c) for c in cycles[:5]]


def test_every_import_inside_a_function_says_why():
    _, inner = _imports(_modules())
    assert inner                                             # there are a few, each explained
    unexplained = [where for where, _, why in inner if not why]
    # a group of lazy imports shares one comment: only the first import of a group needs it
    assert len(unexplained) <= 4, unexplained


def test_no_function_is_over_80_lines():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append((path, node.name, node.end_lineno - node.lineno + 1))
    assert not long, long


def test_a_method_name_is_spelled_in_few_files():
    from planc.plan.registry import METHODS

    pattern = re.compile("|".join(rf"[\"']{re.escape(n)}[\"']" for n in METHODS))
    spelled = sorted(os.path.relpath(p, ROOT) for p in _modules().values() if pattern.search(open(p).read()))
    assert len(spelled) <= 3 and "planc/plan/registry.py" in spelled, spelled
