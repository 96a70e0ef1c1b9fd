"""The package's shape: stages import only earlier stages, no cycles, no method names outside
the methods, one spec per method."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import swudi_jax as sj
from swudi_jax.methods import registry
from swudi_jax.methods.spec import KINDS, MethodSpec
from swudi_jax.model.layout import LEAF_KINDS

PACKAGE = Path(sj.__file__).parent
STAGES = ("maths", "methods", "scale", "model", "checkpoint", "demo")
"""Data flows one way: each stage may import only the stages before it (and itself)."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (module-level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # ``from pkg import mod`` depends on pkg.mod alone; ``from pkg import name`` on pkg
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "swudi_jax":
                found.add(target)
    return found


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None


def test_no_module_imports_a_later_stage():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        own = _stage(name)
        if own is None:
            continue
        for target in _imports(name, path, modules):
            theirs = _stage(target)
            if theirs is None or theirs > own:
                bad.append(f"{name} -> {target}")
    assert not bad, "imports against the data flow: " + ", ".join(sorted(bad))


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items() if name != "swudi_jax"}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("module", ["model/merger.py", "model/layout.py", "model/flat.py", "checkpoint/pipeline.py",
                                    "checkpoint/cli.py", "checkpoint/config.py", "scale/sharding.py", "scale/lora.py"])
def test_the_merger_the_pipeline_and_the_cli_name_no_method(module):
    strings = {node.value for node in ast.walk(ast.parse((PACKAGE / module).read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    # "linear" and "passthrough" are also the words for kinds of leaves (and "linear" a kind
    # of method): the structural vocabulary, not a method's name
    structural = set(KINDS) | set(LEAF_KINDS)
    named = sorted(strings & (set(registry.available_methods()) - structural))
    assert not named, f"{module} names the method(s) {named}; it should read their specs"


def test_every_builtin_method_is_one_spec_listed_once_in_its_own_module():
    names = [spec.name for spec in registry.BUILTIN_METHODS]
    assert len(names) == len(set(names))
    for spec in registry.BUILTIN_METHODS:
        assert isinstance(spec, MethodSpec) and spec is registry.get_method(spec.name)
        module = inspect.getmodule(spec.fn).__name__
        assert module.startswith("swudi_jax.methods."), (spec.name, module)
        assert set(spec.defaults) <= set(inspect.signature(spec.fn).parameters), spec.name
