"""The row-sharded path equals the single-device path, and each device holds only its rows.

The multi-device checks run in a subprocess with 8 host CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set before JAX
starts); ``tests/sharding_checks.py`` prints what it measured as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import random_task_vectors

import swudi_jax as sj
from swudi_jax.scale.sharding import DEFAULT_SHARD_BYTES, make_row_mesh, merge_sharded, should_shard

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(HERE / "sharding_checks.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_subprocess_sees_eight_devices(eight_devices):
    assert eight_devices["n_devices"] == 8


@pytest.mark.parametrize("case, tol", [
    ("swudi_f32", 1e-5), ("swudi_a_entropy_f32", 1e-5), ("swudi_a_gavish_donoho_f32", 1e-5),
    ("swudi_presharded_f32", 1e-5), ("swudi_4_devices_f32", 1e-5), ("swudi_uneven_rows_f32", 1e-5),
    ("pinv_f64", 1e-10), ("swudi_a_participation_sqrt_f64", 1e-12), ("swudi_init_zero_f64", 1e-12),
    ("swudi_topk_f64", 1e-12), ("swudi_family_f32", 1e-5), ("swudi_a_family_f32", 1e-5),
])
def test_sharded_merge_equals_single_device_merge(eight_devices, case, tol):
    result = eight_devices["cases"][case]
    assert result["rel_err"] <= tol
    assert result["dtype"] == ("float64" if case.endswith("f64") else "float32")
    assert all(shard["max_abs_diff"] <= 10 * tol for shard in result["shards"])


@pytest.mark.parametrize("case, n_devices", [("swudi_f32", 8), ("pinv_f64", 8), ("swudi_4_devices_f32", 4)])
def test_each_device_holds_only_its_own_rows(eight_devices, case, n_devices):
    result = eight_devices["cases"][case]
    m, n = result["shape"]
    assert result["spec"] == "P('rows', None)"
    shards = sorted(result["shards"], key=lambda s: s["rows"][0])
    assert len(shards) == n_devices and len({s["device"] for s in shards}) == n_devices
    assert [s["rows"] for s in shards] == [[i * m // n_devices, (i + 1) * m // n_devices] for i in range(n_devices)]
    assert all(s["shape"] == [m // n_devices, n] for s in shards)


@pytest.mark.parametrize("case, tol", [
    ("swudi_make_mesh_f32", 1e-5), ("swudi_make_mesh_presharded_f32", 1e-5),
    ("swudi_make_mesh_from_auto_placement_f32", 1e-5), ("swudi_uneven_rows_make_mesh_f32", 1e-5),
    ("swudi_lowrank_make_mesh_f32", 1e-3),
])
def test_a_jax_make_mesh_explicit_axis_mesh_is_accepted_and_keeps_the_result_on_it(eight_devices, case, tol):
    assert eight_devices["make_mesh_axis_types"] == "(Explicit,)"
    result = eight_devices["cases"][case]
    assert result["rel_err"] <= tol
    assert "Explicit" in result["mesh"]
    assert result["spec"] == ("P()" if "uneven" in case else "P('rows', None)")
    auto = eight_devices["cases"][case.replace("_make_mesh", "").replace("_presharded", "")
                                  .replace("_from_auto_placement", "")]
    assert "Auto" in auto["mesh"]
    assert result["rel_err"] == pytest.approx(auto["rel_err"], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("case, tol", [
    ("swudi_lowrank_f64", 1e-12), ("swudi_auto_is_lowrank_f64", 1e-12), ("swudi_a_lowrank_f64", 1e-12),
    ("pinv_lowrank_f64", 1e-10), ("swudi_lowrank_vs_full_f64", 1e-10), ("swudi_lowrank_f32", 1e-3),
    ("swudi_uneven_rows_lowrank_f32", 1e-3),
])
def test_sharded_lowrank_solver_equals_the_single_device_result(eight_devices, case, tol):
    result = eight_devices["cases"][case]
    assert result["rel_err"] <= tol
    assert all(shard["max_abs_diff"] <= 10 * tol for shard in result["shards"])


def test_sharded_lowrank_solver_is_refused_when_c_has_full_rank(eight_devices):
    assert "solver='lowrank' needs N·m <= n" in eight_devices["lowrank_refusal"]


def test_rows_that_do_not_divide_are_padded_exactly_and_returned_replicated_with_a_warning(eight_devices):
    result = eight_devices["cases"]["swudi_uneven_rows_f32"]
    assert result["shape"] == [60, 48] and result["spec"] == "P()"
    assert all(s["shape"] == [60, 48] for s in result["shards"])
    (message,) = eight_devices["uneven_warnings"]
    assert "60 rows" in message and "8 devices" in message and "replicated" in message


def test_whole_model_merge_takes_the_sharded_path_on_request_with_the_same_result(eight_devices):
    assert eight_devices["merge_shard_rel_err"] <= 1e-5


def test_the_report_of_a_sharded_merge_matches_the_single_device_report(eight_devices):
    shard = eight_devices["report_shard"]
    assert shard["same_bytes"]  # report=True changes no merged byte on the sharded path either
    sharded, single = shard["layers"]
    assert sharded["spectral"]["kept_rank"] == single["spectral"]["kept_rank"] == 32  # ⌈0.65 · 48⌉
    np.testing.assert_allclose(sharded["per_task_sum"], single["per_task_sum"], rtol=1e-6)
    np.testing.assert_allclose(sharded["per_task_merged"], single["per_task_merged"], rtol=1e-4)


def test_whole_model_merge_refuses_a_bad_shard_option_before_compute():
    base = {"w": np.ones((4, 6), np.float32)}
    experts = [{"w": np.full((4, 6), 1.0 + i, np.float32)} for i in range(1, 3)]
    with pytest.raises(ValueError, match="multi_device must be True, False or 'auto', got 'yes'"):
        sj.merge(base, experts, "swudi", layout="torch", multi_device="yes")


def test_single_device_mesh_gives_the_single_device_result():
    tau = random_task_vectors(0, 3, 8, 12)
    merged = merge_sharded(tau, make_row_mesh(), "swudi", rank_ratio=0.5)
    want = np.asarray(sj.swudi(tau, rank_ratio=0.5))
    assert np.linalg.norm(np.asarray(merged) - want) <= 1e-5 * np.linalg.norm(want)


def test_bad_arguments_are_rejected_before_compute():
    tau = random_task_vectors(0, 3, 8, 12)
    mesh = make_row_mesh()
    with pytest.raises(ValueError, match="mesh"):
        merge_sharded(tau, "cpu")
    with pytest.raises(ValueError, match="an axis named 'rows'"):
        merge_sharded(tau, jax.make_mesh((1,), ("data",)))
    with pytest.raises(ValueError, match="method"):
        merge_sharded(tau, mesh, "ties_paper")
    with pytest.raises(ValueError, match="no option"):
        merge_sharded(tau, mesh, "swudi", rank_rule="entropy")
    with pytest.raises(ValueError, match="shape"):
        merge_sharded(tau[0], mesh)
    with pytest.raises(ValueError, match="topk"):
        merge_sharded(tau, mesh, "pinv", solver="topk")
    bad = tau.copy()
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        merge_sharded(bad, mesh)


def test_should_shard_needs_several_devices_and_a_big_stack():
    big = (8, 4096, 11008)
    assert should_shard(big, 8)
    assert not should_shard(big, 1)
    assert not should_shard((8, 64, 64), 8)
    assert should_shard((8, 64, 64), 2, threshold_bytes=8 * 64 * 64 * 4)
    assert not should_shard((8, 64, 64), 2, threshold_bytes=8 * 64 * 64 * 4 + 1)
    assert DEFAULT_SHARD_BYTES == 256 * 2**20


# ----------------------------------------------------------------------------- any mesh (issue 19)

MERGE_MESHES = ["explicit", "auto", "grid", "grid_auto"]


@pytest.mark.parametrize("mesh", MERGE_MESHES)
@pytest.mark.parametrize("multi_device", [True, False])
def test_merge_of_params_sharded_over_any_mesh_equals_the_numpy_merge_and_keeps_their_sharding(eight_devices, mesh,
                                                                                             multi_device):
    case = eight_devices["any_mesh"][f"merge_{mesh}_{multi_device}"]
    assert case["rel_err"] <= (1e-5 if multi_device else 0.0)
    assert case["kept"]  # every leaf on its base leaf's mesh (axis types included) with its spec
    assert case["sharded_layers"] == (2 if multi_device else 0)  # both Dense kernels took the row-sharded path
    explicit = mesh in ("explicit", "grid")
    assert any("@rows" in t for t in case["types"]) == explicit  # the sharding is in the type on Explicit axes
    if mesh == "grid":
        assert "float32[48@data,64@rows]" in case["types"]


def test_merge_with_the_mesh_in_context_and_an_elementwise_method_on_explicit_axes(eight_devices):
    report = eight_devices["any_mesh"]
    assert report["merge_explicit_in_context"]["rel_err"] <= 1e-5 and report["merge_explicit_in_context"]["kept"]
    assert report["merge_explicit_ties"]["rel_err"] == 0.0 and report["merge_explicit_ties"]["kept"]


@pytest.mark.parametrize("case", ["swudi_False", "swudi_True", "ties_False", "ties_True"])
def test_explicit_params_stacked_on_their_devices_as_on_an_accelerator(eight_devices, case):
    result = eight_devices["any_mesh"]["accelerator_path"][case]
    assert result["rel_err"] <= 1e-5 and result["kept"]


def test_numpy_inputs_land_on_the_default_device(eight_devices):
    assert eight_devices["any_mesh"]["numpy_inputs_devices"] == ["cpu:0"]


@pytest.mark.parametrize("how", ["named", "from_context", "jit"])
def test_merge_sharded_under_a_context_mesh(eight_devices, how):
    result = eight_devices["any_mesh"]["context"][how]
    assert result["rel_err"] <= 1e-5 and result["mesh_kept"]
    assert result["type"] == "float32[64@rows,48]"


def test_merge_sharded_on_a_two_dimensional_mesh_splits_rows_over_its_rows_axis(eight_devices):
    result = eight_devices["any_mesh"]["grid_merge_sharded"]
    assert result["rel_err"] <= 1e-5 and result["mesh_kept"]
    assert result["type"] == "float32[64@rows,48]"


@pytest.mark.parametrize("method, tol", [("swudi", 1e-5), ("swudi_a", 1e-5), ("iwudi", 1e-4), ("pinv", 1e-3),
                                         ("swudi_grid", 1e-5)])
def test_layer_functions_take_a_stack_on_explicit_axes_and_return_on_its_sharding(eight_devices, method, tol):
    runs = eight_devices["any_mesh"]["layer"][method]
    assert set(runs) == ({"eager", "jit", "jit_in_context"} if method.startswith("swudi") and method != "swudi_a"
                         else {"eager", "jit"})
    want = "float32[64@rows,48@data]" if method == "swudi_grid" else "float32[64@rows,48]"
    for result in runs.values():
        assert result["rel_err"] <= tol and result["mesh_kept"] and result["type"] == want
