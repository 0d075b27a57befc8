"""The direction of imports (ARCHITECTURE.md): pure bookkeeping imports no torch, each layer of
the stack imports only what is below it, optional libraries stay in their one module, the model
file knows no quantization, and there is no import circle anywhere in tokenmill/ (function-local
imports included: they hide the real graph, they do not break it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "tokenmill"

PURE = [
    "tokenmill.config",
    "tokenmill.config_quant",
    "tokenmill.sampling_params",
    "tokenmill.kv.block_pool",
    "tokenmill.kv.manager",
    "tokenmill.kv.specs",
    "tokenmill.kv.moves",
    "tokenmill.kv.tiers",
    "tokenmill.engine.request",
    "tokenmill.engine.scheduler",
    "tokenmill.engine.messages",
    "tokenmill.models.arch",
    "tokenmill.cost.tco",
    "tokenmill.cost.energy",
    "tokenmill.cost.plan",
    "tokenmill.bench.metrics",
    "tokenmill.bench.scaling",
    "tokenmill.partition.profiles",
    "tokenmill.partition.slices",
    "tokenmill.partition.planner",
    "tokenmill.partition.cgroups",
    "tokenmill.fleet.config",
    "tokenmill.fleet.router",
    "tokenmill.profiles.hardware",
    "tokenmill.profiles.choose",
]

# package -> packages (or modules) it must never import: the stack is layers <- models <- worker
# <- executor <- engine.core <- serve/cli; the pure modules sit at the bottom.
FORBIDDEN = {
    "tokenmill.layers": (
        "tokenmill.models",
        "tokenmill.worker",
        "tokenmill.executor",
        "tokenmill.engine",
        "tokenmill.serve",
        "tokenmill.cli",
    ),
    "tokenmill.models": (
        "tokenmill.worker",
        "tokenmill.executor",
        "tokenmill.engine",
        "tokenmill.serve",
        "tokenmill.cli",
    ),
    "tokenmill.worker": (
        "tokenmill.executor",
        "tokenmill.engine.core",
        "tokenmill.engine.engine",
        "tokenmill.engine.async_engine",
        "tokenmill.serve",
        "tokenmill.cli",
    ),
    "tokenmill.executor": (
        "tokenmill.engine.core",
        "tokenmill.engine.engine",
        "tokenmill.engine.async_engine",
        "tokenmill.serve",
        "tokenmill.cli",
    ),
    "tokenmill.engine": ("tokenmill.serve", "tokenmill.cli"),
    "tokenmill.kv": ("tokenmill.engine", "tokenmill.worker", "tokenmill.layers"),
    "tokenmill.quant.formats": ("tokenmill.layers",),
    "tokenmill.quant.methods": ("tokenmill.models",),
    "tokenmill.models.llama": ("tokenmill.quant",),
}
# third-party library -> the only places that may import it
CONFINED = {
    "fastapi": ("tokenmill.serve",),
    "starlette": ("tokenmill.serve",),
    "uvicorn": ("tokenmill.serve",),
    "ray": ("tokenmill.executor.ray_executor", "tokenmill.fleet.ray_client"),
    "pynvml": ("tokenmill.cost.energy", "tokenmill.partition"),
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}")
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = {resolve(i, known) for i in imports(path, known) if i.startswith("tokenmill")}
        edges[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return edges


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_pure_modules_import_no_torch_or_fastapi():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE)
        + (
            "bad = [m for m in ('torch', 'fastapi', 'numpy') if m in sys.modules]\n"
            "assert not bad, bad\n"
        )
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_layer_imports_only_what_is_below_it():
    bad = []
    for name, targets in graph().items():
        for package, banned in FORBIDDEN.items():
            if within(name, package):
                bad += [(name, t) for t in targets for b in banned if within(t, b)]
    assert not bad, bad


def test_optional_libraries_stay_in_their_modules():
    known = modules()
    bad = []
    for name, path in known.items():
        for lib in {i.split(".")[0] for i in imports(path, known)} & set(CONFINED):
            if not any(within(name, home) for home in CONFINED[lib]):
                bad.append((name, lib))
    assert not bad, bad


def find_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return circles


def test_no_import_circles():
    circles = find_circles(graph())
    assert not circles, circles


def test_the_checker_sees_a_circle_and_a_forbidden_import(tmp_path, monkeypatch):
    """The graph is real: a planted circle and a planted upward import are both found."""
    pkg = tmp_path / "tokenmill"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers" / "__init__.py").write_text("")
    (pkg / "layers" / "a.py").write_text("def f():\n    from tokenmill.layers import b\n")
    (pkg / "layers" / "b.py").write_text(
        "from tokenmill.layers.a import f\nimport tokenmill.serve\n"
    )
    (pkg / "serve.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    edges = graph()
    assert edges["tokenmill.layers.a"] == {"tokenmill.layers.b"}
    assert edges["tokenmill.layers.b"] == {"tokenmill.layers.a", "tokenmill.serve"}
    assert find_circles(edges) == [["tokenmill.layers.a", "tokenmill.layers.b"]]
