"""House rules the code keeps, checked: no private names of other modules or dependencies outside
contrastive/adapters.py, layers that only point down (no import cycle between the package's parts),
and no function of 80 lines or more."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

from conftest import REPO

SOURCES = [*(REPO / "contrastive").rglob("*.py"), *(REPO / "data_tools").rglob("*.py")]

# the dunders that are part of Python's own data model, not anyone's private parts
DATA_MODEL = {
    "__file__",
    "__name__",
    "__dict__",
    "__wrapped__",
    "__class__",
    "__module__",
    "__qualname__",
    "__doc__",
    "__path__",
    "__version__",
    "__init__",
    "__call__",
    "__fspath__",
}


def private_uses(path: Path) -> list[str]:
    """`x._name` (x not self or cls), `getattr(x, "_name")`, and imports of `_name`s, in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and node.attr not in DATA_MODEL:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            owner, name = (node.args + [None, None])[:2]
            mine = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
            if (
                not mine
                and isinstance(name, ast.Constant)
                and str(name.value).startswith("_")
                and name.value not in DATA_MODEL
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: getattr {name.value}")
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names = [a.name for a in node.names] + (node.module or "").split(".")
            found += [f"{path.relative_to(REPO)}:{node.lineno}: import {n}" for n in names if n.startswith("_")]
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = ["contrastive", *rel.parts] if rel.parts[0] == "data_tools" else list(rel.parts)
    return ".".join(p for p in parts if p != "__init__")


def part(module: str) -> str:
    """The unit layers are drawn between: a subpackage (contrastive.data) or a top-level module."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    """part -> the parts it imports (module-level and inside functions alike)."""
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for path in SOURCES:
        here = part(module_name(path))
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("contrastive."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("contrastive.")]
            graph[here].update(part(n) for n in names if part(n) != here)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_private_names_outside_the_adapter_module():
    found = [hit for path in SOURCES if path.name != "adapters.py" for hit in private_uses(path)]
    assert not found, "private names used outside contrastive/adapters.py:\n" + "\n".join(found)
    assert private_uses(REPO / "contrastive" / "adapters.py")  # the check sees them where they are


def test_layers_only_point_down():
    graph = import_graph()
    assert graph["contrastive.training"] and graph["contrastive.cli"]  # the check sees imports
    assert not cycles(graph), cycles(graph)


def test_no_function_of_80_lines():
    sizes = [
        (node.end_lineno - node.lineno + 1, f"{path.relative_to(REPO)}:{node.name}")
        for path in SOURCES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    assert max(sizes)[0] < 80, sorted(sizes)[-5:]


def distributed_uses(path: Path) -> list[str]:
    """Imports of torch.distributed, and `torch.distributed.<x>` reached through `torch`, in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            names = ["torch.distributed"] if getattr(node.value, "id", None) == "torch" else []
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.startswith("torch.distributed")]
    return found


def test_no_collective_outside_the_distributed_module():
    """NCCL serves CUDA tensors only, and the gloo tests cannot tell: every collective goes through
    contrastive/distributed.py, whose helpers put each tensor where the group serves it."""
    home = REPO / "contrastive" / "distributed.py"
    found = [hit for path in SOURCES if path != home for hit in distributed_uses(path)]
    assert not found, "torch.distributed used outside contrastive/distributed.py:\n" + "\n".join(found)
    assert distributed_uses(home)  # the check sees them where they are
