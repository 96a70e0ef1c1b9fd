"""benchmarks/gpu_check.sh and its driver on their CPU fallback (--quick --cpu): the script runs,
each section reports, the JSON and the table are written, and JAX agrees with the torch
transcription (skipped where PyTorch, an optional benchmark dependency, is missing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from benchmarks import gpu_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_driver_in_process_quick_cpu_runs_every_benchmark_section(tmp_path):
    report = gpu_check.main(["--quick", "--cpu", "--in-process", "--sections", "vit,minilm,llm",
                             "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["mode"] == "quick, cpu" and set(saved["sections"]) == {"vit", "minilm", "llm"}
    vit = report["sections"]["vit"]
    assert vit["status"] == "ok" and vit["max_rel_diff"] <= 1e-4 and vit["jax_compiles"] > 0
    for name in ("minilm", "llm"):
        sec = report["sections"][name]
        assert sec["status"] == "ok" and sec["groups"]
        assert all(g["max_rel_diff"] <= 1e-4 and g["jax_eigh_floor_s"] > 0 for g in sec["groups"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "ViT-B/32-shaped 2-block merge" in table and "llm stacks" in table


def test_shell_script_runs_a_section_in_a_subprocess_and_writes_into_out(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick", "--cpu", "--sections",
                           "llm"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["llm"]["status"] == "ok", report["sections"]["llm"]
    assert "gpu_check: exit status 0" in (tmp_path / "gpu_check.log").read_text()


def test_a_section_over_the_time_budget_is_skipped_not_run(tmp_path):
    report = gpu_check.main(["--quick", "--cpu", "--sections", "llm", "--budget", "5", "--out-dir", str(tmp_path)])
    assert report["sections"]["llm"]["status"] == "skipped (time budget)"
