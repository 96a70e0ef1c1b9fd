"""The package as a JAX library ships: every public module declares ``__all__`` naming only what it
has, ``py.typed`` is in the built wheel (PEP 561), the top-level functions are annotated, and
``help(sj.merge)`` states the scales that run."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import swudi_jax as sj
from swudi_jax.methods import registry

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    """Every module of swudi_jax and swudi_jax_cli but ``__main__`` scripts."""
    names = []
    for top in ("swudi_jax", "swudi_jax_cli"):
        package = importlib.import_module(top)
        names.append(top)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{top}.")
                  if not m.name.endswith("__main__")]
    return names


@pytest.mark.parametrize("name", public_modules())
def test_every_public_module_declares_all_with_names_it_has(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    names = list(module.__all__)
    assert len(names) == len(set(names)), f"{name}.__all__ repeats a name"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not have: {missing}"


def test_every_top_level_function_is_annotated():
    unannotated = []
    for name in sj.__all__:
        obj = getattr(sj, name)
        if not inspect.isfunction(obj):
            continue
        signature = inspect.signature(obj)
        bare = [p.name for p in signature.parameters.values()
                if p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if bare or signature.return_annotation is inspect.Signature.empty:
            unannotated.append((name, bare, signature.return_annotation is inspect.Signature.empty))
    assert not unannotated


@pytest.mark.slow
def test_the_wheel_ships_py_typed(tmp_path):
    """Built from a copy of the sources (nothing is written into the checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for package in ("swudi_jax", "swudi_jax_cli"):
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                target = src / path.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    script = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))"
    (tmp_path / "dist").mkdir()
    done = subprocess.run([sys.executable, "-c", script], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
    assert "swudi_jax/py.typed" in files
    assert "swudi_jax/maths/placement.py" in files and "swudi_jax_cli/__init__.py" in files


def test_help_of_merge_states_the_scales_that_run():
    doc = " ".join(sj.merge.__doc__.split())
    scales = {m: registry.default_scale(m) for m in registry.available_methods()}
    assert {m for m, s in scales.items() if s != 1.0} == {"task_arithmetic_paper", "dare"}
    assert scales["task_arithmetic_paper"] == scales["dare"] == 0.3 and scales["task_arithmetic"] == 1.0
    assert "0.3 for ``task_arithmetic_paper`` and ``dare``" in doc
    assert "1 for mergekit's ``task_arithmetic`` and every other method" in doc


def test_the_hf_example_config_writes_float32_as_its_comment_says(tmp_path):
    """``dtype: float32`` with ``out_dtype: null`` writes float32 (mergekit's rule), not the bf16 inputs' dtype."""
    example = ROOT / "examples" / "merge_hf_safetensors.yaml"
    config_path = tmp_path / "merge.yaml"
    config_path.write_text(example.read_text())
    for folder in ("base", "expert_math", "expert_code", "expert_chat"):
        (tmp_path / folder).mkdir()
    config = sj.load_config(config_path)
    assert (config.dtype, config.out_dtype) == ("float32", "float32")
    (comment,) = [line for line in example.read_text().splitlines() if line.startswith("out_dtype:")]
    assert "float32" in comment and "null" in comment


def test_the_flax_example_footer_reads_the_scales_from_the_registry():
    source = (ROOT / "examples" / "merge_flax_experts.py").read_text()
    assert "sj.registry.default_scale(m)" in source and "task_arithmetic_paper" in source
    assert "λ = 0.3" not in source  # no hard-coded scale left to go stale
