"""The package's layout: imports between its parts run one way (no cycle between top-level
modules and packages), and the settings and checkpoints never import the training code.

Read from the source (ast), so it fails on the import that closes a cycle, whichever module
it is added to."""

from __future__ import annotations

import ast
import collections
import pathlib

import distil_jax

ROOT = pathlib.Path(distil_jax.__file__).parent


def _module_files():
    out = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(("distil_jax",) + f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _part(module: str) -> str:
    """distil_jax.train.step -> train; distil_jax.config -> config."""
    return module.split(".")[1]


def _imports(files):
    """Module -> the distil_jax modules it imports (anywhere in the file)."""
    out = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distil_jax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("distil_jax."))
        out[name] = {d for d in deps if d != "distil_jax"}
    return out


def _part_graph():
    graph = collections.defaultdict(set)
    for module, deps in _imports(_module_files()).items():
        for d in deps:
            if _part(d) != _part(module):
                graph[_part(module)].add(_part(d))
    return graph


def _cycle(graph):
    """One cycle of part names, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_imports_between_the_parts_of_the_package_run_one_way():
    graph = _part_graph()
    assert {"train", "interop", "bench", "apps", "models", "data"} <= set(graph)  # the parser sees them
    assert _cycle(graph) is None, f"an import cycle between parts of the package: {' -> '.join(_cycle(graph))}"


def test_the_cycle_check_finds_a_cycle():
    """The check itself: an edge back from the bottom of the graph is reported."""
    graph = _part_graph()
    graph["parallel"].add("train")
    assert _cycle(graph) is not None


def test_settings_checkpoints_and_metrics_read_the_terms_not_the_training_code():
    imports = _imports(_module_files())
    for module in ("distil_jax.config", "distil_jax.checkpoint", "distil_jax.metrics", "distil_jax.terms"):
        training = sorted(d for d in imports[module] if d.startswith("distil_jax.train"))
        assert not training, f"{module} imports {training}"
