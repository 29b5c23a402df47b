"""The layer rule docs/architecture.md states, checked on the source: every import inside fastdiff/ (inside functions
too) goes to the same layer or one below, imports form no circle, and no module imports a private name (leading
underscore) from another fastdiff module."""

from __future__ import annotations

import ast
import os

import pytest
from repo_paths import REPO

PACKAGE = os.path.join(REPO, "fastdiff")

LAYERS = [
    # bottom: the compiled core, the op and its kernels, what needs nothing of fastdiff
    ["fastdiff._ext", "fastdiff._C", "fastdiff._ops", "fastdiff._moved", "fastdiff.extras", "fastdiff.kernels"],
    ["fastdiff.schedule", "fastdiff.samplers", "fastdiff.program", "fastdiff.nets", "fastdiff.png"],
    ["fastdiff.runtime"],  # the shared loop: the op's wrapper, graphs, guidance, x0 limits, checks
    ["fastdiff.request"],
    ["fastdiff.solvers"],  # ODE, eager samplers, likelihood, inversion: on any PipelineLike
    ["fastdiff.pipeline"],
    ["fastdiff.checkpoint", "fastdiff.diffusers", "fastdiff.pretrained"],
    ["fastdiff.eval", "fastdiff.serving"],
    # top: entry points and the one-release aliases of moved modules
    [
        "fastdiff.bench",
        "fastdiff.demos",
        "fastdiff.cli",
        "fastdiff.__main__",
        "fastdiff",
        "fastdiff.models",
        "fastdiff.interpolate",
        "fastdiff.likelihood",
        "fastdiff.ode",
        "fastdiff.quality",
        "fastdiff.train",
        "fastdiff.x0_clip",
    ],
]


def _layer(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "fastdiff" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _modules() -> dict:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()
EXTENSIONS = {"fastdiff._C", "fastdiff._ops"}  # compiled, importable, no source here


def _imports(module: str, path: str):
    """(imported module, name or None, module level?) for every fastdiff import in the file."""
    tree = ast.parse(open(path).read())
    top_level = set()
    for node in tree.body:
        for sub in ast.walk(node):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                break
            top_level.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fastdiff":
                    yield alias.name, None, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module} uses a relative import: fastdiff imports absolutely"
            base = node.module or ""
            if base.split(".")[0] != "fastdiff":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                known = target in MODULES or target in EXTENSIONS
                yield (target if known else base), alias.name, id(node) in top_level


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_sideways_and_take_no_private_names(module):
    for target, name, _ in _imports(module, MODULES[module]):
        if target in EXTENSIONS:
            continue
        assert _layer(target) <= _layer(module), (
            f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)}), a layer above it"
        )
        private = name is not None and name.startswith("_") and f"{target}.{name}" not in MODULES | EXTENSIONS
        assert not private or target == module, f"{module} imports the private name {name} from {target}"


def test_no_import_circles():
    """No circle, imports inside functions included (a lazy import is still a dependency)."""
    graph = {m: {t for t, _, _ in _imports(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # a package's __init__ is imported before its submodules: an import of the package by its own submodule is
    # not a circle in practice unless the __init__ imports that submodule back at module level, which the search
    # below finds.
    state: dict = {}

    def visit(node: str, stack: list) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                if not _package_of(nxt, node):
                    raise AssertionError("import circle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _package_of(package: str, module: str) -> bool:
    """Whether ``package`` is a package that contains ``module`` (Python imports the package first anyway)."""
    return module.startswith(package + ".") and MODULES[package].endswith("__init__.py")
