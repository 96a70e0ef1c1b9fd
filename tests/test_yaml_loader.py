"""Hostile and careless YAML configs (issue 20, items 6, 7, 14 and duplicate keys): refused with a
message naming the file and the key or line, never a hang, a raw exception or a string for a number."""

from __future__ import annotations

import time

import pytest

from swudi_jax.checkpoint.config import ConfigError, load_config
from swudi_jax.checkpoint.yaml_loader import MAX_NODES, load_yaml


def _write(tmp_path, text: str):
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def test_numbers_as_people_write_them_are_numbers():
    got = load_yaml("a: 1e-5\nb: 1.5e3\nc: -2E+2\nd: 12\ne: 0.5\nf: 1e-5x\n")
    assert got == {"a": 1e-5, "b": 1500.0, "c": -200.0, "d": 12, "e": 0.5, "f": "1e-5x"}
    assert isinstance(got["a"], float) and isinstance(got["d"], int)


def test_billion_laughs_is_refused_fast_naming_the_file(tmp_path):
    text = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10))
    path = _write(tmp_path, text + "merge_method: swudi\nparameters: {time: *a9}\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"config {path}: .*more than {MAX_NODES:,} YAML nodes"):
        load_config(path)
    assert time.perf_counter() - start < 5.0  # a bound, not a benchmark: the unbounded file took minutes


def test_small_aliases_still_load():
    assert load_yaml("x: &p {density: 0.5}\ny: *p\n") == {"x": {"density": 0.5}, "y": {"density": 0.5}}


@pytest.mark.parametrize("text, message", [
    ("merge_method: swudi\nmerge_method: ties\n", r"duplicate key 'merge_method' \(line 1 and line 2\)"),
    ("merge_method: swudi\nparameters: {time: 1" + "0" * 400 + "}\n", r"integer 1000.* is too large"),
    ("merge_method: swudi\nparameters: {seed: 1000000000000000000000000000000}\n", r"too large"),
    ("a: " + "[" * 20000 + "]" * 20000 + "\n", r"nests deeper"),
])
def test_bad_yaml_is_one_clear_error_naming_the_file(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"config {path}: invalid YAML .*{message}"):
        load_config(path)
