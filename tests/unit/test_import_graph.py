"""The import graph of the three packages is a DAG that runs one way: shard_server -> cache -> model.

Read statically (ast), so an import inside a function or under TYPE_CHECKING counts too: a cycle that
only type hints close is still a cycle a reader has to untangle. grpc and the generated stubs stay in
shard_server.server (and the testing tools that speak the wire protocol).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "cache", "shard_server")
# A package may import itself and the packages listed here, nothing else of ours.
ALLOWED = {"model": set(), "cache": {"model"}, "shard_server": {"cache", "model"}}
GRPC_USERS = ("shard_server.server", "shard_server.testing", "shard_server.pb")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            if "pb" in path.relative_to(REPO).parts:
                continue  # generated stubs
            out[module_name(path)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that `name` imports (resolving relative imports and `from pkg import module`)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the longest known module prefix of t
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in known:
                    out.add(cand)
                    break
    out.discard(name)
    return out


def grpc_importers(modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in modules.items():
        if name.startswith(GRPC_USERS):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            if any(m == "grpc" or m.startswith(("grpc.", "grpc_", "shard_server.pb")) for m in mods):
                bad.append(name)
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = our_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_packages_import_one_way(graph):
    wrong = [
        f"{src} imports {dst}"
        for src, dsts in graph.items()
        for dst in dsts
        if dst.split(".")[0] != src.split(".")[0] and dst.split(".")[0] not in ALLOWED[src.split(".")[0]]
    ]
    assert not wrong, "imports against shard_server -> cache -> model:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles(graph):
    # Package __init__ edges to their own submodules are how a package re-exports; they are not cycles
    # a reader fights, so a module importing its parent package is not counted as closing one.
    def edges(src):
        return {d for d in graph[src] if not src.startswith(d + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges(node)):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_grpc_stays_in_the_server_package():
    assert grpc_importers(our_modules()) == []


def test_the_checker_sees_a_cycle_and_a_wrong_direction(tmp_path):
    """The checker itself: resolution of relative and `from pkg import mod` imports."""
    known = {"model", "model.a", "model.b", "cache", "cache.c"}
    (tmp_path / "a.py").write_text("from . import b\nfrom cache.c import X\n")
    (tmp_path / "b.py").write_text("from .a import thing\n")
    assert imports_of("model.a", tmp_path / "a.py", known) == {"model", "model.b", "cache.c"}
    assert imports_of("model.b", tmp_path / "b.py", known) == {"model.a"}
