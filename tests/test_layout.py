"""The package's layout: no import cycle among dgl_jax's modules, with imports inside functions counted too."""

import ast
import pathlib

PKG = pathlib.Path(__file__).parents[1] / "dgl_jax"
MODULES = {p.stem: p for p in PKG.glob("*.py")}


def _imports(path: pathlib.Path) -> set[str]:
    """dgl_jax modules imported anywhere in ``path`` (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "dgl_jax" and node.level == 0:
            names = [f"dgl_jax.{a.name}" if a.name in MODULES else "dgl_jax" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "dgl_jax":
                continue
            if len(parts) == 1:
                out.add("__init__")
            elif parts[1] in MODULES:
                out.add(parts[1])
    return out - {path.stem}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle():
    graph = {name: _imports(path) for name, path in MODULES.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_algorithms_do_not_import_the_trainer():
    for name in ("stage", "objective", "steps", "asynchronous", "dni", "parallel", "codecs", "buffer", "vq"):
        assert not _imports(MODULES[name]) & {"trainer", "methods", "config", "cli"}, name
    assert not _imports(MODULES["trainer"]) & {"asynchronous", "dni", "vq_train"}  # executors (parallel) are fine


def test_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
