"""The package's layering, read from the code: every import (module level or inside a function) of a
`jaguar` module points to its own layer or one below, in the order

    config, io, errors, formats, ... -> data, models -> shared layer (jaguar.core, RunDir)
    -> train, retrieval -> report -> cli

neither train nor retrieval imports the other, the report imports nothing that computes
post-processing (its figures come from jaguar.retrieval.split_figures), there are no import
circles, logging is configured in one place, and no module is past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaguar"

# (layer, module prefixes); a module takes the layer of its longest matching prefix
LAYERS = [
    (0, ("jaguar", "jaguar.config", "jaguar.io", "jaguar.errors", "jaguar.formats", "jaguar.untrusted_names",
         "jaguar.checksums", "jaguar.lock", "jaguar.progress", "jaguar.logs")),
    (1, ("jaguar.data", "jaguar.models")),
    (2, ("jaguar.core", "jaguar.run", "jaguar.run_records", "jaguar.run_checkpoints", "jaguar.run_features",
         "jaguar.folders", "jaguar.verify")),
    (3, ("jaguar.train", "jaguar.retrieval", "jaguar.pseudo")),
    (4, ("jaguar.report", "jaguar.ensemble")),
    (5, ("jaguar.cli", "jaguar.__main__")),
]
_PREFIXES = sorted(((prefix, layer) for layer, prefixes in LAYERS for prefix in prefixes),
                   key=lambda item: -len(item[0]))


def layer_of(module: str) -> int:
    for prefix, layer in _PREFIXES:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The jaguar modules `path` imports anywhere in it (a `from package import module` names the module)."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base == "jaguar" or base.startswith("jaguar."):
                modules = {f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")}
                found |= modules
                if len(modules) < len(node.names):  # names defined in `base` itself
                    found.add(base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "jaguar"}
    return found


GRAPH = {_module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_down_the_layers():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in GRAPH.items() for target in targets
              if layer_of(target) > layer_of(module)]
    assert not upward, "imports that run back up:\n  " + "\n  ".join(sorted(upward))


@pytest.mark.parametrize("one, other", [("jaguar.train", "jaguar.retrieval"), ("jaguar.retrieval", "jaguar.train")])
def test_training_and_retrieval_do_not_import_each_other(one, other):
    crossing = [f"{module} imports {target}" for module, targets in GRAPH.items() if module.startswith(one + ".")
                for target in targets if target == other or target.startswith(other + ".")]
    assert not crossing, crossing


def test_the_report_imports_nothing_that_computes_post_processing():
    computing = [f"{module} imports {target}" for module, targets in GRAPH.items()
                 if module.startswith("jaguar.report") for target in targets
                 if target.startswith("jaguar.retrieval.post") or target.startswith("jaguar.retrieval.rank")]
    assert not computing, computing


def test_no_import_circles():
    """No module reaches itself through the imports of the modules it imports (Tarjan's strongly
    connected components over the whole graph, function-level imports included)."""
    index, low, on_stack, stack, circles, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target not in GRAPH:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_the_dense_or_top_m_choice_is_made_in_one_function():
    """`retrieval.mode` and `retrieval.topm_above` are read only by jaguar.retrieval.post.search."""
    readers = sorted({_module_name(path) for path in PACKAGE.rglob("*.py")
                      for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, ast.Attribute) and node.attr in ("topm_above", "mode")
                      and isinstance(node.value, ast.Attribute) and node.value.attr == "retrieval"
                      or isinstance(node, ast.Attribute) and node.attr == "topm_above"})
    assert readers == ["jaguar.retrieval.post.search"], readers


def test_logging_is_configured_in_one_place():
    calls = [_module_name(path) for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "basicConfig"]
    assert calls == ["jaguar.logs"], calls


def test_no_module_is_past_400_lines():
    long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"split these along their concepts: {long}"
