"""Smoke runs of the benchmarks on tiny shapes: they run end to end and report every method.

No timing is asserted (times depend on the machine); only that each figure exists and is positive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def layer_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import layer_speed

    return layer_speed


def test_layer_speed_smoke(layer_speed, tmp_path):
    out = tmp_path / "layer_speed.json"
    payload = layer_speed.main(["--tiny", "--repeats", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["ratios"] == json.loads(json.dumps(payload["ratios"]))
    runs = written["runs"]["methods"]
    assert set(runs) == set(layer_speed.METHODS)
    for name, run in runs.items():
        assert run["time_s"] > 0, name
        assert all(t > 0 for g in run["groups"] for t in g["times_s"]), name
        assert len(run["groups"]) == len(layer_speed.TINY), name
        assert run["peak_rss_bytes"] >= run["baseline_rss_bytes"] > 0, name
        assert run["compile_s"] >= 0, name
    reference = runs["wudi_reference"]["extrapolated"]
    assert reference["measured_steps"] == [2, 4] and reference["per_step_s"] > 0
    assert set(written["ratios"]) >= {"speedup_vs_wudi_reference", "speedup_vs_wudi_gram",
                                      "swudi_over_eigh_floor", "peak_rss_swudi_over_wudi_reference"}
    assert all(r["value"] > 0 for r in written["ratios"].values())


def test_synthetic_blocks_do_not_depend_on_how_many_are_asked_for(layer_speed):
    group = layer_speed.TINY[1]
    one = layer_speed.synthetic_group(1, group, 1, n_experts=3, seed=7)
    three = layer_speed.synthetic_group(1, group, 3, n_experts=3, seed=7)
    assert one.shape == (1, 3, group.m, group.n) and three.dtype == np.float32
    np.testing.assert_array_equal(three[:1], one)
    assert not np.allclose(three[1], three[0])


def test_time_calls_keeps_every_repeat_and_rejects_zero_repeats(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import _measure

    calls = []
    timing = _measure.time_calls(lambda: calls.append(1) or np.zeros(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing.times) == 3 and timing.median >= 0
    with pytest.raises(ValueError, match="repeats"):
        _measure.time_calls(lambda: None, repeats=0)


def test_multihost_projection_splits_a_70b_merge_and_stops_at_its_largest_layer(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import multihost

    out = tmp_path / "multihost.json"
    payload = multihost.main(["--project-only", "--project-hosts", "1", "4", "1000", "--out", str(out)])
    projection = json.loads(out.read_text())["projection"]
    assert projection == json.loads(json.dumps(payload["projection"]))
    hours = [row["hours"] for row in projection["hosts"]]
    assert hours[0] == pytest.approx(projection["total_hours_one_host"])
    assert hours[1] == pytest.approx(hours[0] / 4, rel=0.01)  # 560 layers balance well over 4 hosts
    assert hours[2] * 3600 == pytest.approx(projection["largest_layer_s"])  # one layer per host: the largest bounds it
    # down_proj (n = 28672) costs more than q_proj (n = 8192): the eigh grows as n³
    assert projection["per_layer_s"]["down_proj"] > 10 * projection["per_layer_s"]["q_proj"]


def test_cpu_matmul_smoke(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # main sets them; restored after
        monkeypatch.setenv(var, "2")
    from benchmarks import cpu_matmul

    out = tmp_path / "cpu_matmul.json"
    payload = cpu_matmul.main(["--shapes", "64x32", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(payload["rows"]))
    assert {"xla default", "numpy"} <= {r["side"] for r in rows}
    for row in rows:
        assert (row["rows"], row["n"]) == (64, 32) and row["seconds"] > 0 and row["gflops"] > 0, row
        assert row["rel_diff"] < 1e-5, row  # every side computes aᵀa


def test_layer_floor_smoke_with_a_gram_block_or_a_git_revision_as_the_before(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import layer_floor

    import subprocess

    in_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    for before in (["--min-block", "8"], ["--before", "HEAD"])[:2 if in_git else 1]:  # an sdist has no git
        out = tmp_path / "layer_floor.json"
        payload = layer_floor.main(["--preset", "tiny", "--rounds", "1", "--out", str(out), *before])
        groups = json.loads(out.read_text())["result"]["groups"]
        assert [g["group"] for g in groups] == [g[0] for g in layer_floor.PRESETS["tiny"][1]]
        for g in groups:
            assert g["swudi_s"] > 0 and g["before_s"] > 0 and g["eigh_s"] > 0, (before, g)
            assert g["max_abs_diff_before"] < 1e-4, (before, g)  # the same estimator either way
        assert payload["result"]["total"]["after_over_before"] > 0
