"""No import cycle among the modules of the package, counting imports inside functions too: each
module's dependencies form a tree that can be read (and imported) bottom up."""
import ast
import importlib.util
from pathlib import Path

# the package the tests run against (its compiled _C included): the checkout's, or the installed
# one when the tests run from an unpacked source distribution, whose sources have no _C
PACKAGE = Path(importlib.util.find_spec("moediffuseq").origin).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*"):
        if path.suffix == ".py" or (path.suffix in (".so", ".pyd") and path.parent == PACKAGE):
            parts = list(path.relative_to(PACKAGE.parent).parts)
            parts[-1] = parts[-1].split(".")[0]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _known(name: str, modules) -> str:
    """The module a dotted name lives in: itself, or the nearest enclosing module."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path, modules) -> set[str]:
    """The modules that importing ``name`` runs (its own enclosing packages, already being
    imported, left out)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            targets |= submodules or {base}
    deps = set()
    for target in targets:
        if target.split(".")[0] != PACKAGE.name:
            continue
        target = _known(target, modules)
        parts = target.split(".")
        chain = {".".join(parts[:i]) for i in range(1, len(parts))}  # enclosing packages run first
        deps |= {p for p in chain if not (name == p or name.startswith(p + "."))} | {target}
    deps.discard(name)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) if path.suffix == ".py" else set() for name, path in modules.items()}
    assert "moediffuseq.train" in graph and "moediffuseq.ops.moe_ffn" in graph
    cycles = _cycles(graph)
    detail = ["; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert not cycles, "import cycles: " + " | ".join(detail)


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
