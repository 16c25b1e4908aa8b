"""No import cycles among edgemm's modules: module-level and function-level imports alike, read from the AST.

A lazy import inside a function still ties two modules together (one cannot be understood, tested or moved without
the other), so both kinds count. The package's own layout maps export/, runtimes/ and calib/ to edgemm.export,
edgemm.runtimes and edgemm.calib (pyproject.toml)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"edgemm": ROOT / "edgemm", "edgemm.export": ROOT / "export", "edgemm.runtimes": ROOT / "runtimes",
                "edgemm.calib": ROOT / "calib"}


def modules() -> dict[str, Path]:
    """module name -> file, for every .py file of the installed namespace."""
    out = {}
    for pkg, d in PACKAGE_DIRS.items():
        for f in sorted(d.rglob("*.py")):
            parts = list(f.relative_to(d).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            if pkg == "edgemm" and parts and parts[0] in ("export", "runtimes", "calib"):
                continue                                   # not there, but never shadow the mapped folders
            out[name] = f
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the edgemm modules it imports anywhere in its body (the closest existing module of each name)."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, f in mods.items():
        here = mod if _is_package(mod, mods) else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import name`: name may be a submodule
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                r = resolve(t) if t.startswith("edgemm") else None
                if r and r != mod:
                    edges[mod].add(r)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_imports():
    """The reader must see what it is meant to see, or the cycle test below passes vacuously."""
    mods = modules()
    edges = import_edges(mods)
    assert {"edgemm.cli", "edgemm.export.onnx", "edgemm.runtimes.ort_backend", "edgemm.calib.stats"} <= set(mods)
    assert "edgemm.errors" in edges["edgemm.config"]                         # a module-level relative import
    assert "edgemm.runtimes" in edges["edgemm.cli"] or any(e.startswith("edgemm.runtimes") for e in edges["edgemm.cli"])
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_edges(modules()))
    edges = import_edges(modules())
    lines = []
    for comp in cycles:
        lines.append(f"cycle of {len(comp)}: " + ", ".join(comp))
        lines += [f"    {a} -> {b}" for a in comp for b in sorted(edges[a]) if b in comp]
    assert not cycles, "import cycles among edgemm modules:\n" + "\n".join(lines)
