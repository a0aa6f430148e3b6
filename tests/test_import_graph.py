"""The package's import graph: no import circles, no hf_posenc import inside a function, no upward import.

Every module of ``hf_posenc/`` is parsed (nothing is imported), and every import of an hf_posenc module is
an edge: ``from .kernels import tiling`` runs ``hf_posenc/kernels/__init__.py`` first, so it is an edge to the
package as well as to the module (except to the importer's own packages, which are initialising already).
A circle hidden behind an import inside a function still shows here, since those are edges too; and such
imports are refused outright, as they exist only to hide a circle. Third-party imports inside functions
(optional dependencies, slow imports) are fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hf_posenc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Floors: these modules import only hf_posenc modules under the listed prefixes (``""``: none at all).
#: ``_hf`` is the one home of transformers internals, below everything that uses it; the kernels know
#: the registry's capabilities and the call's positions, never an encoding, the conversion or the plug-in.
FLOORS = {
    "hf_posenc._hf": (),
    "hf_posenc.registry": (),
    "hf_posenc.positions": (),
    "hf_posenc.kernels": ("hf_posenc.kernels", "hf_posenc.registry", "hf_posenc.positions"),
    "hf_posenc.module_tree": (),
    "hf_posenc.architectures": ("hf_posenc.registry", "hf_posenc.module_tree"),
    "hf_posenc.model_shape": ("hf_posenc.architectures",),
    "hf_posenc.layout": ("hf_posenc.architectures",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The hf_posenc modules an import statement names (a ``from`` import of a package's submodule names it)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if node.level:
        base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    names = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    return [target, *names] if len(names) < len(node.names) else names


def with_packages(importer: str, target: str) -> list[str]:
    """``target`` and the packages above it that importing it initialises (not the importer's own)."""
    parts = target.split(".")
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    return [name for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if name in MODULES and name not in own]


def imports(importer: str) -> tuple[set[str], set[str]]:
    """``(edges, imported inside a function)`` of one module: hf_posenc modules only."""
    tree = ast.parse(MODULES[importer].read_text(), filename=str(MODULES[importer]))
    edges, lazy = set(), set()

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in resolve(importer, child):
                    reached = with_packages(importer, target)
                    edges.update(reached)
                    if inside and target != importer:
                        lazy.add(target)
            visit(child, inside)

    visit(tree, False)
    edges.discard(importer)
    return edges, lazy


GRAPH = {name: imports(name) for name in MODULES}


def circles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node][0]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            connect(name)
    return found


def test_the_graph_sees_the_package():
    """Guards the tests below: every module parsed, and the known edges found."""
    assert {"hf_posenc", "hf_posenc.attention", "hf_posenc.kernels", "hf_posenc.kernels.select"} <= set(GRAPH)
    assert "hf_posenc.kernels" in GRAPH["hf_posenc.attention"][0]
    assert "hf_posenc.kernels.tiling" in GRAPH["hf_posenc.encodings.alibi"][0]
    assert "hf_posenc.kernels" in GRAPH["hf_posenc.encodings.alibi"][0]  # the package initialises first
    assert "hf_posenc.registry" in GRAPH["hf_posenc.encodings.alibi"][0]


def test_no_import_circles():
    found = circles()
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_hf_posenc_import_inside_a_function():
    found = sorted((name, target) for name, (_, lazy) in GRAPH.items() for target in lazy)
    assert not found, "imports inside functions (move them to the top of the module): " + "; ".join(
        f"{name} imports {target}" for name, target in found)


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_nothing_imports_upward(floor):
    allowed = FLOORS[floor]
    members = [name for name in GRAPH if name == floor or name.startswith(floor + ".")]
    upward = sorted((name, target) for name in members for target in GRAPH[name][0]
                    if not any(target == a or target.startswith(a + ".") for a in allowed))
    assert not upward, f"{floor} imports above its floor: " + "; ".join(f"{n} imports {t}" for n, t in upward)
