"""The structure stays visible: no import loops (function-local imports included), nothing in the library imports
benchmark or test helpers, no module imports another module's underscore names, and one registration mechanism
serves banks, policies, styles and retrievers.

The import graph is read from the source with ``ast`` (every ``import`` anywhere in a file, except under
``if TYPE_CHECKING:``, which never runs), with the installed layout applied: ``backends/`` is
``memkit.backends``, ``integrations/`` is ``memkit.integrations`` and ``benchmarks/bench/`` is ``memkit.bench``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"memkit": ROOT / "memkit", "memkit.backends": ROOT / "backends",
            "memkit.integrations": ROOT / "integrations", "memkit.bench": ROOT / "benchmarks" / "bench"}
HELPERS = ("memkit.testing", "memkit.bench")  # test and benchmark helpers: the library never imports them


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        if not folder.is_dir():
            continue
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *rel))
            if name.startswith("memkit.") and name.split(".")[1] in ("backends", "integrations", "bench") and \
                    pkg == "memkit":
                continue  # not the installed place of these folders
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """[(imported module, [imported names])] of one file, TYPE_CHECKING blocks excluded."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            out.append((base, [n for n in names if f"{base}.{n}" not in modules]))
            out += [(s, []) for s in subs]
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, list[str]]]]]:
    modules = _modules()
    raw = {m: _imports(m, p, modules) for m, p in modules.items()}
    graph = {m: set() for m in modules}
    for m, imps in raw.items():
        for target, _ in imps:
            while target and target not in modules:  # `import memkit.x.y` -> the deepest known module
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != m:
                graph[m].add(target)
    return graph, raw


def test_no_import_loops() -> None:
    graph, _ = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    loops: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                loops.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    packages = {m for m in graph if (_modules()[m].name == "__init__.py")}
    # A package's __init__ importing its own submodules is the package's face, not a loop of behaviour.
    real = [c for c in loops if not any(m in packages and all(x == m or x.startswith(m + ".") for x in c)
                                        for m in c)]
    assert not real, f"import loops: {real}"


def test_the_library_imports_no_benchmark_or_test_helpers() -> None:
    graph, _ = _graph()
    bad = [(m, t) for m, targets in graph.items() for t in targets
           if not m.startswith(HELPERS) and t.startswith(HELPERS)]
    assert not bad, f"library modules importing test/benchmark helpers: {bad}"


def test_no_module_imports_another_modules_private_names() -> None:
    _, raw = _graph()
    bad = [(m, t, n) for m, imps in raw.items() for t, names in imps for n in names
           if n.startswith("_") and not n.startswith("__") and t.startswith("memkit") and t != m]
    assert not bad, f"private names imported across modules: {bad}"


def test_one_registration_mechanism() -> None:
    from memkit.bank import BACKENDS
    from memkit.policy import POLICIES
    from memkit.registry import Registry
    from memkit.retrievers import RETRIEVERS
    from memkit.styles import STYLES

    for reg, names in ((BACKENDS, {"faiss-flat", "disk"}), (POLICIES, {"lru", "recency_frequency"}),
                       (STYLES, {"memlong", "longmem"}), (RETRIEVERS, {"text", "keys"})):
        assert isinstance(reg, Registry) and names <= set(reg.names())
