"""Run by tests/test_sharding.py in a subprocess with 8 host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): compares the row-sharded path with
the single-device one and records where each device's rows live. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_task_vectors, rel_err  # noqa: E402

import swudi_jax as sj  # noqa: E402
from swudi_jax.scale.sharding import make_row_mesh, merge_sharded, row_sharding  # noqa: E402

SINGLE = {
    "swudi": lambda t, **o: sj.swudi(t, solver="full", **o),
    "swudi_a": lambda t, **o: sj.swudi_a(t, solver="full", **o),
    "pinv": lambda t, **o: sj.pinv_merge(t, solver="full"),
}


def layout(result, single):
    """Each addressable shard: its device, row range, shape, and whether it equals those rows."""
    shards = []
    for shard in result.addressable_shards:
        rows = shard.index[0]
        shards.append({
            "device": shard.device.id,
            "rows": [rows.start or 0, rows.stop if rows.stop is not None else result.shape[0]],
            "shape": list(shard.data.shape),
            "max_abs_diff": float(np.max(np.abs(np.asarray(shard.data, np.float64)
                                                - np.asarray(single, np.float64)[rows]))),
        })
    return {"spec": str(result.sharding.spec), "shape": list(result.shape), "shards": shards}


def compare(name, tau, mesh, method, single_solver="full", **options):
    solver = options.pop("solver", "full")
    host = np.asarray(tau)  # the single-device reference runs on the host copy
    single = SINGLE[method](host, **options) if single_solver == "full" else SINGLE_BY[method](
        host, solver=single_solver, **options)
    result = merge_sharded(tau, mesh, method, solver=solver, **options)
    return name, {"rel_err": rel_err(result, single), "dtype": str(result.dtype), "mesh": str(result.sharding.mesh),
                  **layout(result, single)}


SINGLE_BY = {"swudi": sj.swudi, "swudi_a": sj.swudi_a, "pinv": lambda t, solver: sj.pinv_merge(t, solver=solver)}


def main():
    report = {"n_devices": jax.device_count()}
    mesh = make_row_mesh()
    explicit = jax.make_mesh((8,), ("rows",))  # Explicit axis in current JAX
    report["make_mesh_axis_types"] = str(getattr(explicit, "axis_types", None))
    tau32 = random_task_vectors(0, 4, 64, 48)
    tau_wide32 = random_task_vectors(5, 3, 16, 96)  # N·m = 48 < n = 96: C rank-deficient
    cases = [
        compare("swudi_f32", tau32, mesh, "swudi"),
        compare("swudi_a_entropy_f32", tau32, mesh, "swudi_a", rank_rule="entropy"),
        compare("swudi_a_gavish_donoho_f32", tau32, mesh, "swudi_a", rank_rule="gavish_donoho"),
        compare("swudi_presharded_f32", jax.device_put(tau32, row_sharding(mesh)), mesh, "swudi", time=300.0),
        compare("swudi_4_devices_f32", tau32, make_row_mesh(jax.devices()[:4]), "swudi"),
        compare("swudi_family_f32", tau32, mesh, "swudi", tikhonov_alpha=0.01, gamma=2.0, time=30.0,
                alignment=0.5, alignment_reference=0.3),
        compare("swudi_a_family_f32", tau32, mesh, "swudi_a", rank_rule="cumvar_0.9", filter="wiener"),
        compare("swudi_make_mesh_f32", tau32, explicit, "swudi"),
        compare("swudi_make_mesh_presharded_f32", jax.device_put(tau32, row_sharding(explicit)), explicit, "swudi"),
        compare("swudi_make_mesh_from_auto_placement_f32", jax.device_put(tau32, row_sharding(mesh)), explicit,
                "swudi"),
        compare("swudi_lowrank_f32", tau_wide32, mesh, "swudi", single_solver="lowrank", solver="lowrank"),
        compare("swudi_lowrank_make_mesh_f32", tau_wide32, explicit, "swudi", single_solver="lowrank",
                solver="lowrank"),
    ]
    with jax.enable_x64(True):
        tau64 = random_task_vectors(1, 3, 32, 40, dtype=np.float64)
        tau_wide64 = random_task_vectors(6, 3, 16, 96, dtype=np.float64)
        cases += [
            compare("pinv_f64", tau64, mesh, "pinv"),
            compare("swudi_a_participation_sqrt_f64", tau64, mesh, "swudi_a"),
            compare("swudi_init_zero_f64", tau64, mesh, "swudi", init="zero", rank_ratio=0.3),
            compare("swudi_topk_f64", random_task_vectors(2, 4, 64, 160, rank=2, noise=0.02, dtype=np.float64),
                    mesh, "swudi", rank_ratio=0.05, solver="topk"),
            compare("swudi_lowrank_f64", tau_wide64, mesh, "swudi", single_solver="lowrank", solver="lowrank"),
            compare("swudi_lowrank_vs_full_f64", tau_wide64, mesh, "swudi", solver="lowrank"),
            compare("swudi_auto_is_lowrank_f64", tau_wide64, mesh, "swudi", single_solver="lowrank", solver="auto"),
            compare("swudi_a_lowrank_f64", tau_wide64, mesh, "swudi_a", single_solver="lowrank", solver="lowrank"),
            compare("pinv_lowrank_f64", tau_wide64, mesh, "pinv", single_solver="lowrank", solver="lowrank"),
        ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases.append(compare("swudi_uneven_rows_f32", random_task_vectors(3, 4, 60, 48), mesh, "swudi"))
    report["uneven_warnings"] = [str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uneven-rows warning, checked above
        cases.append(compare("swudi_uneven_rows_make_mesh_f32", random_task_vectors(3, 4, 60, 48), explicit, "swudi"))
        cases.append(compare("swudi_uneven_rows_lowrank_f32", random_task_vectors(7, 3, 12, 96), mesh, "swudi",
                             single_solver="lowrank", solver="lowrank"))
    try:
        merge_sharded(random_task_vectors(8, 4, 32, 48), mesh, "swudi", solver="lowrank")
        report["lowrank_refusal"] = None
    except ValueError as exc:
        report["lowrank_refusal"] = str(exc)
    rng = np.random.default_rng(4)
    base = {"blocks.0.attn.weight": rng.normal(size=(64, 48)).astype(np.float32),
            "blocks.0.attn.bias": rng.normal(size=(64,)).astype(np.float32)}
    experts = [{k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
               for _ in range(4)]
    whole = {shard: sj.merge(base, experts, "swudi", layout="torch", multi_device=shard) for shard in (True, False)}
    report["merge_shard_rel_err"] = max(rel_err(whole[True][k], whole[False][k]) for k in base)
    reported = {shard: sj.merge(base, experts, "swudi", layout="torch", multi_device=shard, report=True)
                for shard in (True, False)}
    report["report_shard"] = {
        "same_bytes": all(np.asarray(reported[True][0][k]).tobytes() == np.asarray(whole[True][k]).tobytes()
                          for k in base),
        "layers": [r[1].layers[0].to_dict() for r in (reported[True], reported[False])]}
    report["cases"] = dict(cases)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
