"""The shape of the house (DESIGN.md): no import cycles between smollm's modules, lazy imports included."""
import ast
import subprocess
import sys
from pathlib import Path

import smollm

PKG = Path(smollm.__file__).resolve().parent


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    "Each smollm module -> the smollm modules it imports anywhere in its file (inside functions too)."
    modules = {_module(p): p for p in PKG.rglob("*.py") if p.name != "_modidx.py"}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "The strongly connected components with more than one module (Tarjan's algorithm)."
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index: visit(v)
    return out


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_lazy_imports():
    g = import_graph()
    assert "smollm.kernels" in g["smollm.norms"]          # `from .kernels import rms_norm`
    assert g["smollm.errors"] == set()


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"smollm modules that import each other (move what both need into a room below): {found}"


def test_report_needs_no_torch():
    code = "import smollm.report, sys; assert 'torch' not in sys.modules, 'smollm.report imported torch'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
