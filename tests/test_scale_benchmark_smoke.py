"""Smoke run of benchmarks/scale.py --quick: every case runs and reports agreement.

No timing is asserted (times depend on the machine); only that each figure exists, is
positive, and that the fast paths agree with the full path to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_benchmark_quick_mode_runs_every_case(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import scale

    out = tmp_path / "scale.json"
    scale.main(["--quick", "--repeats", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    rows = {row["case"].split(":")[0]: row for row in written["results"]}
    assert set(rows) == {"lowrank", "lora", "topk", "topk eigensolver only", "sharded"}
    for name, row in rows.items():
        assert row["fast_s"] > 0 and row["full_s"] > 0 and row["speedup"] > 0, name
        assert row["rel_diff"] <= 1e-3, name  # float32; the full path's null-space rounding dominates
    assert rows["topk"]["subspace_converged"]
    assert rows["sharded"]["n_devices"] == 8 and rows["sharded"]["spec"] == "P('rows', None)"
    assert rows["sharded"]["shard_shapes"] == [[8, 48]]
