"""The persistent compilation cache: where it lives, how it is switched off, and that a second
process merging the same shapes compiles nothing (each run in a fresh subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swudi_jax.checkpoint.compile_cache import ENV_VAR, default_cache_dir, resolve_cache_dir

HERE = Path(__file__).resolve().parent


def run_checks(env_updates: dict) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_updates}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, str(HERE / "compile_cache_checks.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_folder_is_under_the_users_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_cache_dir() == tmp_path / "swudi_jax" / "jax"
    assert resolve_cache_dir() == tmp_path / "swudi_jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "swudi_jax" / "jax"


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false", "no", " none "])
def test_the_variable_switches_the_cache_off(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    assert resolve_cache_dir() is None
    assert resolve_cache_dir(value) is None


def test_the_variable_relocates_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert resolve_cache_dir() == tmp_path / "elsewhere"


def test_a_second_process_merging_the_same_shapes_compiles_nothing(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), ENV_VAR: ""}
    first = run_checks(env)
    second = run_checks(env)
    assert first["folder"] == str(tmp_path / "xdg" / "swudi_jax" / "jax")
    assert first["misses"] > 0 and first["files"] > 0
    assert second["misses"] == 0 and second["hits"] >= first["misses"]
    assert second["files"] == first["files"]
    assert second["checksum"] == first["checksum"]
    assert (Path(first["folder"]).stat().st_mode & 0o077) == 0  # private to the user


def test_switched_off_the_merge_runs_and_writes_no_cache(tmp_path):
    out = run_checks({"XDG_CACHE_HOME": str(tmp_path / "xdg"), ENV_VAR: "off"})
    assert out["folder"] is None and out["hits"] == 0
    assert not (tmp_path / "xdg").exists()
