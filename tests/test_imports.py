"""The package's modules import one another in one direction: no import cycle inside paligemma/.

Every import counts wherever it is written (module level, inside a function, under TYPE_CHECKING): a
lazy import hides a cycle from Python's loader, not from a reader. Importing `a.b.c` also runs the
package `a.b`'s `__init__`, so that is an edge too, unless `a.b` is a package of the importer itself
(already being imported, as Python always does parents first).
"""

from __future__ import annotations

import ast
import importlib.util
from collections import deque
from pathlib import Path

PACKAGE = "paligemma"


def module_files(root: Path, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package) for every .py file under `root`, the package's folder."""
    modules = {}
    for file in sorted(root.rglob("*.py")):
        parts = [package, *file.relative_to(root).with_suffix("").parts]
        if "__pycache__" in parts:
            continue
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (absolute or relative, at any depth of the file)."""
    modules = module_files(root, package)

    def known(name: str) -> str:  # `from .x import y` where y is a name: the module is .x
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, (file, is_package) in modules.items():
        own_package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names if a.name.split(".")[0] == package}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = own_package.rsplit(".", node.level - 1)[0] if node.level > 1 else own_package
                    base = f"{base}.{node.module}" if node.module else base
                elif node.module and node.module.split(".")[0] == package:
                    base = node.module
                else:
                    continue
                for alias in node.names:  # `from . import lora` imports the module .lora
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known(base))
        edges = set()
        for target in targets:
            edges.add(target)
            edges |= {p for p in _ancestors(target) if p not in _ancestors(name)}  # parents' __init__ run first
        graph[name] = {t for t in edges if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] through each group of modules that reach one another, [] if none."""
    return [_shortest_cycle(graph, group) for group in cycle_groups(graph)]


def cycle_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one node, or of one that imports itself (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    start = min(group)
    previous = {start: None}
    queue = deque([start])
    while queue:  # breadth-first inside the group, back to start
        node = queue.popleft()
        for succ in sorted(graph[node] & group):
            if succ == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if succ not in previous:
                previous[succ] = node
                queue.append(succ)
    raise AssertionError(f"no cycle in strongly connected group {group}")


# ---------------------------------------------------------------------- the walker itself

def test_find_cycles_spells_out_each_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"b", "c"}}) == []  # a diamond is no cycle
    assert find_cycles({"model": {"weights"}, "weights": {"inference"}, "inference": {"weights"}}) == [
        ["inference", "weights", "inference"]]
    cycles = find_cycles({"a": {"b"}, "b": {"c", "x"}, "c": {"a"}, "x": {"y"}, "y": {"x"}, "z": {"z"}})
    assert sorted(cycles) == [["a", "b", "c", "a"], ["x", "y", "x"], ["z", "z"]]


def test_import_graph_sees_relative_lazy_and_package_imports(tmp_path):
    files = {
        "__init__.py": "from .model import Model\n",
        "model.py": "import torch\n\ndef save(self):\n    from .weights import save_model\n",
        "weights.py": "from . import hub\nfrom .sub.inner import thing\n",
        "hub.py": "import os\nfrom paligemma.sub import deep\n",
        "sub/__init__.py": "",
        "sub/inner.py": "from ..model import Model\nif False:\n    import paligemma.hub as h\n",
        "sub/deep.py": "from .. import hub\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {
        "paligemma": {"paligemma.model"},
        "paligemma.model": {"paligemma.weights"},
        "paligemma.weights": {"paligemma.hub", "paligemma.sub", "paligemma.sub.inner"},
        "paligemma.hub": {"paligemma.sub", "paligemma.sub.deep"},
        "paligemma.sub": set(),
        "paligemma.sub.inner": {"paligemma.model", "paligemma.hub"},
        "paligemma.sub.deep": {"paligemma.hub"},
    }
    assert sorted(find_cycles(graph)) == [["paligemma.hub", "paligemma.sub.deep", "paligemma.hub"],
                                          ["paligemma.model", "paligemma.weights", "paligemma.sub.inner",
                                           "paligemma.model"]]


# ---------------------------------------------------------------------- the package

def test_package_has_no_import_cycle():
    root = Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0])
    graph = import_graph(root)
    assert len(graph) > 20 and graph["paligemma.model"]  # the walk found the package
    knots = [f"{' -> '.join(_shortest_cycle(graph, group))}  (modules in this cycle: {', '.join(sorted(group))})"
             for group in cycle_groups(graph)]
    assert not knots, "import cycles in paligemma/:\n" + "\n".join(knots)
