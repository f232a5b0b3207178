"""The packages' import graph: no circles, no private names across modules, the exporter's stages
importing only downward (docs/design.md, "Layout"). Read from the source with ast, so imports
inside functions count too."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"persimmon_export": "exporter", "persimmon_runtime": "runtime", "persimmon_plugins": "plugins"}
# the exporter's stage sub-packages and the ones each may import (docs/design.md)
STAGES = {"reference": set(), "load": {"reference"}, "graph": {"load", "reference"}, "engine": {"graph"},
          "deploy": set(), "validate": {"graph", "load", "reference"}}


def modules(package: str) -> dict[str, str]:
    """module name -> source path, for every module of `package`."""
    found = {}
    top = os.path.join(ROOT, PACKAGES[package])
    for directory, _, files in os.walk(os.path.join(top, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def imports(package: str) -> list[tuple[str, str, str]]:
    """(importing module, imported module, imported name or '') for every import inside `package`."""
    known, found = modules(package), []
    for module, path in known.items():
        here = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    found.append((module, submodule, "") if submodule in known else (module, target, alias.name))
            elif isinstance(node, ast.Import):
                found.extend((module, alias.name, "") for alias in node.names)
    return [(a, b, name) for a, b, name in found if b in known and a != b]


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_imports_one_that_imports_it_back(package):
    edges = {}
    for importer, imported, _ in imports(package):
        edges.setdefault(importer, set()).add(imported)
    assert cycles(edges) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_is_imported_from_another_module(package):
    private = [(a, f"{b}.{name}") for a, b, name in imports(package)
               if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_the_exporters_stages_import_only_the_stages_before_them():
    upward = []
    for importer, imported, _ in imports("persimmon_export"):
        source, target = importer.split(".")[1], imported.split(".")[1] if "." in imported else ""
        if source in STAGES and target in STAGES and source != target and target not in STAGES[source]:
            upward.append(f"{importer} -> {imported}")
        if source in STAGES and target in ("build", "options", "cli", "demo", "doctor"):
            upward.append(f"{importer} -> {imported}")  # the pipeline's top imports the stages, not back
    assert upward == []


def test_the_checks_see_a_circle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert ("persimmon_export.build", "persimmon_export.options", "BuildOptions") in imports("persimmon_export")
