"""benchmarks/vs_torch.py --quick: runs, writes its JSON, and the JAX and PyTorch results agree
(skipped where PyTorch, an optional benchmark dependency, is not installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import vs_torch  # noqa: E402
import swudi_jax as sj  # noqa: E402


def test_quick_run_writes_both_workloads_and_the_two_implementations_agree(tmp_path):
    out = tmp_path / "vs_torch.json"
    payload = vs_torch.main(["--quick", "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["quick"] is True and {r["workload"] for r in saved["rows"]} == {"minilm (quick)", "block (quick)"}
    for row in payload["rows"]:
        assert row["max_rel_diff"] <= 1e-4, row
        assert row["tensors"] > 0 and row["first_jax_s"] > 0 and row["warm_torch_s"] > 0


def test_torch_transcription_matches_swudi_jax_on_a_wide_and_a_tall_layer():
    rng = np.random.default_rng(0)
    for shape in [(3, 6, 20), (4, 20, 7)]:
        tau = rng.standard_normal(shape).astype(np.float32)
        want = np.asarray(sj.swudi(tau, solver="full"), np.float64)
        got = vs_torch.torch_swudi(torch.from_numpy(tau)).numpy().astype(np.float64)
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def test_torch_merge_gives_non_matrix_tensors_the_mean_task_vector():
    base = {"w": np.ones((4, 5), np.float32), "b": np.zeros(4, np.float32)}
    experts = [{"w": base["w"] + 0.1 * i, "b": np.full(4, float(i), np.float32)} for i in range(1, 4)]
    merged = vs_torch.torch_merge({k: torch.from_numpy(v) for k, v in base.items()},
                                  [{k: torch.from_numpy(v) for k, v in e.items()} for e in experts])
    np.testing.assert_allclose(merged["b"].numpy(), np.full(4, 2.0), rtol=1e-6)
