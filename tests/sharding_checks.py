"""Run by tests/test_sharding.py in a subprocess with 8 host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): compares the row-sharded path with
the single-device one and records where each device's rows live. Prints one JSON object.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_task_vectors, rel_err  # noqa: E402

import swudi_jax as sj  # noqa: E402
from swudi_jax.model import merger  # noqa: E402
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
    report["any_mesh"] = any_mesh()
    print(json.dumps(report))


# ----------------------------------------------------------------------------- any mesh (issue 19)


class MLP(nn.Module):
    """A Flax docs-style model: Dense, LayerNorm, Dense."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(32)(nn.LayerNorm()(nn.relu(nn.Dense(64)(x))))


def mlp_models(n_experts=3):
    base = MLP().init(jax.random.key(0), jnp.ones((1, 48)))["params"]
    base = jax.tree.map(np.asarray, base)
    rng = np.random.default_rng(9)
    experts = [jax.tree.map(lambda v: (v + 0.05 * rng.normal(size=v.shape)).astype(v.dtype), base)
               for _ in range(n_experts)]
    return base, experts


def shard_params(tree, mesh):
    """Kernels split by output columns (the maths rows) over "rows" (and their inputs over "data"
    on a 2-D mesh), vectors over "rows"."""
    two_d = "data" in mesh.axis_names
    specs = {2: PartitionSpec("data" if two_d else None, "rows"), 1: PartitionSpec("rows")}
    return jax.tree.map(lambda v: jax.device_put(v, NamedSharding(mesh, specs[v.ndim])), tree)


def kept(out, given):
    """Whether every merged leaf has its base leaf's sharding: same mesh (axis types included), same spec."""
    pairs = zip(jax.tree.leaves(out), jax.tree.leaves(given))
    return all(o.sharding.mesh == g.sharding.mesh and str(jax.typeof(o)) == str(jax.typeof(g)) for o, g in pairs)


def tree_err(out, want):
    return max(rel_err(o, w) for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(want)))


@functools.lru_cache(maxsize=None)
def reference_merge(method, options):
    base, experts = mlp_models()
    return sj.merge(base, experts, method, multi_device=False, **dict(options))


def merge_case(base, experts, mesh, multi_device, method="swudi", **options):
    """merge on params sharded over ``mesh``: error against the NumPy-input merge, sharding kept,
    and how many layers took the row-sharded path."""
    calls = []
    original = merger.merge_sharded
    merger.merge_sharded = lambda *a, **k: calls.append(1) or original(*a, **k)  # counts, then runs the real one
    try:
        given = shard_params(base, mesh)
        out = sj.merge(given, [shard_params(e, mesh) for e in experts], method, multi_device=multi_device, **options)
    finally:
        merger.merge_sharded = original
    want = reference_merge(method, tuple(sorted(options.items())))
    return {"rel_err": tree_err(out, want), "kept": kept(out, given), "sharded_layers": len(calls),
            "types": sorted({str(jax.typeof(x)) for x in jax.tree.leaves(out)})}


def stack_case(fn, tau, sharding, context=False):
    """A layer function on a stack placed with ``sharding``: eager, under jit and (``context``)
    under jit with the mesh set; the result's type (sharding included) and error against the
    NumPy call."""
    want = fn(tau)
    placed = jax.device_put(tau, sharding)
    out = {"eager": fn(placed), "jit": jax.jit(fn)(placed)}
    if context:
        with jax.set_mesh(sharding.mesh):
            out["jit_in_context"] = jax.jit(fn)(placed)
    return {how: {"rel_err": rel_err(got, want), "type": str(jax.typeof(got)),
                  "mesh_kept": got.sharding.mesh == sharding.mesh} for how, got in out.items()}


def accelerator_path(base, experts, mesh):
    """The dense path as it runs on GPU/TPU, where leaves are stacked on their devices (host_group
    answers None for device arrays; on CPU it answers NumPy views, so it is made to answer None)."""
    original = merger.host_group
    merger.host_group = lambda *a, **k: None
    try:
        return {f"{method}_{md}": merge_case(base, experts, mesh, md, method, **options)
                for method, options in (("swudi", {}), ("ties", {"density": 0.5})) for md in (False, True)}
    finally:
        merger.host_group = original


def context_cases(tau, explicit):
    """merge_sharded with the mesh set by ``jax.set_mesh``: named, left out, and under jit."""
    want = sj.swudi(tau, solver="full")
    out = {}
    with jax.set_mesh(explicit):
        for how, run in {"named": lambda: merge_sharded(tau, explicit, "swudi", solver="full"),
                         "from_context": lambda: merge_sharded(tau, method="swudi", solver="full"),
                         "jit": lambda: jax.jit(lambda t: merge_sharded(t, explicit, "swudi", solver="full"))(
                             jax.device_put(tau, row_sharding(explicit)))}.items():
            got = run()
            out[how] = {"rel_err": rel_err(got, want), "type": str(jax.typeof(got)),
                        "mesh_kept": got.sharding.mesh == explicit}
    return out


def any_mesh():
    explicit = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Explicit,))
    auto = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
    grid = jax.make_mesh((2, 4), ("data", "rows"), axis_types=(AxisType.Explicit,) * 2)
    grid_auto = jax.make_mesh((2, 4), ("data", "rows"), axis_types=(AxisType.Auto,) * 2)
    base, experts = mlp_models()
    report = {f"merge_{name}_{md}": merge_case(base, experts, mesh, md)
              for name, mesh in (("explicit", explicit), ("auto", auto), ("grid", grid), ("grid_auto", grid_auto))
              for md in (True, False)}
    with jax.set_mesh(explicit):
        report["merge_explicit_in_context"] = merge_case(base, experts, explicit, True)
    report["merge_explicit_ties"] = merge_case(base, experts, explicit, True, "ties", density=0.5)
    report["accelerator_path"] = accelerator_path(base, experts, explicit)
    numpy_out = sj.merge(base, experts, multi_device=False)
    report["numpy_inputs_devices"] = sorted({str(d) for x in jax.tree.leaves(numpy_out) for d in x.devices()})
    tau = random_task_vectors(11, 3, 64, 48)
    report["context"] = context_cases(tau, explicit)
    grid_sharded = merge_sharded(tau, grid, "swudi", solver="full")
    report["grid_merge_sharded"] = {"rel_err": rel_err(grid_sharded, sj.swudi(tau, solver="full")),
                                    "type": str(jax.typeof(grid_sharded)), "mesh_kept": grid_sharded.sharding.mesh == grid}
    rows = NamedSharding(explicit, PartitionSpec(None, "rows", None))
    report["layer"] = {name: stack_case(fn, tau, rows) for name, fn in
                       (("swudi_a", sj.swudi_a), ("pinv", sj.pinv_merge), ("iwudi", sj.iwudi))}
    report["layer"]["swudi"] = stack_case(sj.swudi, tau, rows, context=True)
    report["layer"]["swudi_grid"] = stack_case(sj.swudi, tau, NamedSharding(grid, PartitionSpec(None, "rows", "data")),
                                               context=True)
    return report


if __name__ == "__main__":
    main()
