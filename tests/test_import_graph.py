"""caer_fast's own import graph has no circle, function-level imports included: the library sits below
its command lines, models below serving (issue 23). A circle that only works because one side imports
inside a function is still a circle: this test reads every import statement, wherever it is."""
import ast
from pathlib import Path

import caer_fast

PACKAGE = Path(caer_fast.__file__).parent


def _modules(root: Path) -> dict:
    mods = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _targets(mods: dict, name: str, node) -> list:
    """The caer_fast modules an import statement of module ``name`` loads (a package's ``__init__``
    included: Python runs it before any submodule)."""
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    else:
        if node.level:
            base = name.split(".")
            if mods[name].name != "__init__.py":
                base = base[:-1]
            base = base[:len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        wanted = [module] + [f"{module}.{a.name}" for a in node.names]
    out = set()
    for t in wanted:
        while t and t not in mods:
            t = t.rpartition(".")[0]
        if t and t != name and t.split(".")[0] == PACKAGE.name:
            out.add(t)
    return sorted(out)


def import_graph(root: Path = PACKAGE) -> dict:
    mods = _modules(root)
    edges = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name].update(_targets(mods, name, node))
    # importing a.b.c runs a/__init__ and a/b/__init__ first, but that is not a cycle of a.b.c's making:
    # an edge from a package to its own submodule is kept, one from a submodule to its parent package
    # is dropped (it is always there)
    for name in edges:
        edges[name] = {t for t in edges[name] if not name.startswith(t + ".")}
    return edges


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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


def test_the_checker_sees_a_circle(tmp_path):
    """Function-level imports count: a → b at the top, b → a inside a function is a circle."""
    pkg = tmp_path / PACKAGE.name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..a import x\n    return x\n")
    (pkg / "c.py").write_text("import os\n")
    assert cycles(import_graph(pkg)) == [[f"{PACKAGE.name}.a", f"{PACKAGE.name}.sub.b"]]
    (pkg / "sub" / "b.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []


def test_caer_fast_has_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles in caer_fast: " + "; ".join(" <-> ".join(c) for c in found)


def test_models_do_not_import_serving_or_the_command_lines():
    edges = import_graph()
    clis = {f"caer_fast.{m}" for m in ("predict", "serve", "export", "train", "annotate")}
    for name, targets in edges.items():
        if name.startswith(("caer_fast.models", "caer_fast.ops", "caer_fast.data")):
            up = sorted(t for t in targets if t.startswith("caer_fast.serving") or t in clis)
            assert not up, f"{name} imports upward: {up}"
        if name.startswith("caer_fast.serving"):
            assert not (targets & clis), f"{name} imports a command line: {sorted(targets & clis)}"
