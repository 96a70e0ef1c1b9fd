"""Smoke run of benchmarks/lora_merge.py --quick: the three swudi-merge runs finish and agree.

No timing or memory figure is asserted (they depend on the machine); only that each exists and
that the factor path's merged task vectors agree with the densified path's to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lora_merge_benchmark_quick_mode_runs_every_side(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import lora_merge

    out = tmp_path / "lora_merge.json"
    lora_merge.main(["--quick", "--out", str(out)])
    written = json.loads(out.read_text())
    assert [r["side"] for r in written["results"]] == ["factor", "adapter", "densified"]
    for row in written["results"]:
        assert row["merge_s"] > 0 and row["peak_rss_bytes"] > 0, row["side"]
    assert written["max_rel_task_vector_diff"] <= 1e-3  # float32: the densified path's n×n eigh dominates
