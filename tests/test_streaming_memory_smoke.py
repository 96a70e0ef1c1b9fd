"""Smoke run of benchmarks/streaming_memory.py at tiny sizes (the figures themselves are not tested)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from swudi_jax.checkpoint import io as ckio

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "streaming_memory.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("streaming_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_streaming_benchmark_runs_tiny_and_reports_every_run(tmp_path, capsys):
    bench = load_benchmark()
    result = bench.main(["--smoke", "--no-in-memory", "--workdir", str(tmp_path / "work"),
                         "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == result
    runs = {row["run"]: row for row in result["rows"]}
    assert set(runs) == {"runtime", "stream/0.02MB"}
    assert all(row["peak_rss_bytes"] > 0 for row in runs.values())
    stream = runs["stream/0.02MB"]
    assert stream["groups"] > 1 and 0 < stream["group_bytes"] < (result["experts"] + 2) * result["model_bytes"]
    base = ckio.open_checkpoint(tmp_path / "work" / "base")
    assert len(list((tmp_path / "work" / "base").glob("model-*.safetensors"))) > 1  # a multi-file checkpoint
    on_disk = sum(int(np.prod(base.shape_dtype(k)[0])) * base.shape_dtype(k)[1].itemsize for k in base.keys())
    assert on_disk == result["model_bytes"] and len(base.keys()) == result["tensors"]
    assert "| stream/0.02MB" in capsys.readouterr().out
