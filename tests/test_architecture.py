"""The layers import in one direction only, and no module imports itself back
(docs/architecture.md).

Read from the source files (imports inside functions included), so a lazy import cannot hide a
cycle or an upward arrow.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "item_embeddings"
# Where each installed package lives in the repository (pyproject's package-dir).
SOURCES = {f"{PACKAGE}": ROOT / "src" / PACKAGE,
           f"{PACKAGE}.components": ROOT / "components",
           f"{PACKAGE}.pipeline": ROOT / "pipeline"}
# layer -> the packages it consists of; a layer may import only layers listed after it.
LAYERS = [("ops", [f"{PACKAGE}.ops"]),
          ("pipeline", [f"{PACKAGE}.pipeline"]),
          ("components", [f"{PACKAGE}.components"]),
          ("core", [PACKAGE])]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join(prefix + ([node.module] if node.module else []))
            # "from pkg import sub" imports the submodule when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # item_embeddings.x.y -> the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _layer(module: str) -> int:
    for index, (_, packages) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in packages):
            return index
    raise AssertionError(module)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_layers_import_downwards_only():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in _graph().items() for b in targets if _layer(b) < _layer(a)]
    assert upward == []


def test_no_import_cycles():
    graph = _graph()
    # Importing a package runs its __init__, which imports its submodules: a submodule that
    # imports its own package's __init__ back is a cycle too.
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_the_graph_sees_the_known_arrows():
    """The checks above are only as good as the graph: it must see real imports."""
    graph = _graph()
    assert f"{PACKAGE}.text.encoders" in graph[f"{PACKAGE}.text.step"]
    assert f"{PACKAGE}.pipeline" in graph[f"{PACKAGE}.ops.vertex"]
    assert f"{PACKAGE}.pipeline.pipeline" in graph[f"{PACKAGE}.pipeline"]
    assert f"{PACKAGE}.components.shared" in graph[f"{PACKAGE}.components.embed_text.component"]
    assert f"{PACKAGE}.ops.local_run" in graph[f"{PACKAGE}.ops.local_commands"]  # lazy import


def test_every_package_is_installed():
    """A regular install (the images' ``pip install .``) ships only the listed packages."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert found == listed
