"""No import cycles inside iar_jax: every `import iar_jax...` / `from iar_jax... import` of every module,
at module level or inside a function (a deferred import hides a cycle, it does not remove it), read
with `ast` without importing anything."""
import ast
import os
from typing import Dict, List, Set

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "iar_jax"


def package_modules(root: str, package: str = PACKAGE) -> Dict[str, str]:
    """Dotted module name -> file, for every .py file under root/package (packages by their __init__)."""
    mods = {}
    for d, _, files in os.walk(os.path.join(root, package)):
        for f in files:
            if f.endswith(".py"):
                name = os.path.relpath(os.path.join(d, f[:-3]), root).replace(os.sep, ".")
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(d, f)
    return mods


def import_graph(root: str, package: str = PACKAGE) -> Dict[str, Set[str]]:
    """module -> the package modules it imports anywhere in its source."""
    mods = package_modules(root, package)

    def known(name):  # the module itself or, for `import a.b.attr`, its nearest enclosing module
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names if a.name.split(".")[0] == package)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    parts = mod.split(".")[:len(mod.split(".")) - node.level + is_pkg]
                    base = ".".join(parts + ([base] if base else []))
                if base.split(".")[0] != package:
                    continue
                for a in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in mods else known(base))
        deps.discard(mod)
        deps.discard(package)  # the top-level __init__ only holds the version
        graph[mod] = {d for d in deps if d}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle [a, b, ..., a] per strongly connected component of more than one module."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_cycle_through(min(c), graph, c) for c in comps)


def _cycle_through(start: str, graph, comp) -> List[str]:
    """The shortest import chain start -> ... -> start inside the component `comp` (breadth first)."""
    prev, queue = {start: None}, [start]
    for v in queue:
        for w in sorted(graph[v] & comp):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in a component without a cycle back to it")


def test_no_import_cycles_in_the_package():
    graph = import_graph(REPO)
    assert "iar_jax.models.gpt" in graph["iar_jax.sampling.gpt_step"]  # the walk sees real edges
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _write(root, files):
    for rel, src in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(src)


def test_finds_cycles_hidden_in_functions_and_package_imports(tmp_path):
    _write(tmp_path, {
        "iar_jax/__init__.py": "",
        "iar_jax/a.py": "def f():\n    from iar_jax import b\n",  # `from pkg import module`
        "iar_jax/b.py": "import numpy\nimport iar_jax.sub.c as c\n",
        "iar_jax/sub/__init__.py": "",
        "iar_jax/sub/c.py": "from ..a import f\n",  # relative, back to a
        "iar_jax/sub/d.py": "from iar_jax.sub.c import x\nfrom . import c\n",  # into the cycle, not part of it
        "iar_jax/e.py": "from iar_jax.f import g\n",
        "iar_jax/f.py": "class C:\n    def m(self):\n        import iar_jax.e.attr\n",  # `import module.attr`
    })
    graph = import_graph(str(tmp_path))
    assert graph["iar_jax.sub.d"] == {"iar_jax.sub.c"}
    assert graph["iar_jax.b"] == {"iar_jax.sub.c"}
    assert find_cycles(graph) == [["iar_jax.a", "iar_jax.b", "iar_jax.sub.c", "iar_jax.a"],
                                  ["iar_jax.e", "iar_jax.f", "iar_jax.e"]]


@pytest.mark.parametrize("edges", [{"x": {"y"}, "y": set()}, {"x": set()}])
def test_acyclic_graphs_have_no_cycles(edges):
    assert find_cycles(edges) == []
