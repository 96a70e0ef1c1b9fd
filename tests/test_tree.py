"""Whole-model merging: the golden model, both layouts, grouping, bad input."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import swudi_jax as sj
from swudi_jax.model.layout import group_plans
from swudi_jax.model.merger import merge_group, plan_tree

NAMES = ["embed.weight", "blocks.0.attn.weight", "blocks.0.attn.bias", "blocks.0.mlp.weight",
         "blocks.0.norm.weight", "lm_head.weight"]


@pytest.fixture(scope="module")
def golden_model(golden):
    base = {n: golden[f"model/base/{n}"] for n in NAMES}
    experts = [{n: golden[f"model/expert{i}/{n}"] for n in NAMES} for i in range(4)]
    want = {n: golden[f"model/swudi_t1300_r0.65/{n}"] for n in NAMES}
    return base, experts, want


def test_torch_layout_model_matches_reference_implementation(golden_model):
    base, experts, want = golden_model
    merged = sj.merge(base, experts, method="swudi", layout="torch")
    assert set(merged) == set(NAMES)
    for name in NAMES:
        assert merged[name].dtype == np.float32 and merged[name].shape == want[name].shape
        assert rel_err(merged[name], want[name]) <= 5e-5, name


def flax_model(seed, scale=0.0):
    """A small Linen-style tree: Dense kernels (in, out), biases, a norm scale, an int counter."""
    rng = np.random.default_rng(seed)
    shapes = {"Dense_0": (6, 8), "Dense_1": (8, 8), "Dense_2": (8, 6), "Dense_3": (8, 6)}
    tree = {name: {"kernel": rng.normal(size=s).astype(np.float32), "bias": rng.normal(size=s[1]).astype(np.float32)}
            for name, s in shapes.items()}
    tree["LayerNorm_0"] = {"scale": rng.normal(size=8).astype(np.float32)}
    tree["steps"] = np.array(3, np.int32)
    return tree


def experts_of(base, n, seed=10, size=0.1):
    rng = np.random.default_rng(seed)
    return [jax.tree_util.tree_map(
        lambda x: (x + size * rng.normal(size=x.shape)).astype(x.dtype) if x.dtype.kind == "f" else x, base)
        for _ in range(n)]


def as_torch(tree):
    """The same model as a flat HF-style dict: weight = kernelᵀ."""
    flat = {}
    for name, sub in tree.items():
        if isinstance(sub, dict):
            for leaf, x in sub.items():
                flat[f"{name}.{'weight' if leaf == 'kernel' else leaf}"] = x.T if leaf == "kernel" else x
        else:
            flat[name] = sub
    return flat


@pytest.mark.parametrize("method, options", [("swudi", {}), ("swudi_a", {}), ("ties_paper", {}), ("task_arithmetic_paper", {}),
                                             ("wudi", {"steps": 20})])
def test_flax_and_torch_layouts_merge_to_transposes(method, options):
    base = flax_model(0)
    experts = experts_of(base, 3)
    flax_merged = sj.merge(base, experts, method=method, layout="flax", **options)
    torch_merged = sj.merge(as_torch(base), [as_torch(e) for e in experts], method=method, layout="torch", **options)
    for key, want in as_torch(flax_merged).items():
        np.testing.assert_allclose(np.asarray(torch_merged[key]), np.asarray(want), rtol=2e-5, atol=2e-6, err_msg=key)


def test_structure_dtypes_and_non_float_leaves_are_preserved():
    base = flax_model(1)
    base["Dense_1"] = {k: v.astype(jnp.bfloat16) for k, v in base["Dense_1"].items()}
    base["mask"] = np.array([True, False])
    experts = experts_of(base, 2)
    merged = sj.merge(base, experts)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    for got, ref in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(base)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
    assert int(merged["steps"]) == 3 and merged["mask"].tolist() == [True, False]


def test_mean_leaves_get_the_mean_task_vector_and_excluded_leaves_the_base():
    base = flax_model(2)
    experts = experts_of(base, 3)
    merged = sj.merge(base, experts, exclude=["Dense_3/*"])
    want_bias = np.mean([e["Dense_0"]["bias"] for e in experts], axis=0)
    np.testing.assert_allclose(merged["Dense_0"]["bias"], want_bias, rtol=1e-5, atol=1e-6)
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(merged["Dense_3"][leaf], base["Dense_3"][leaf])
    kept = sj.merge(base, experts, include=["Dense_0/*"], others="keep")
    np.testing.assert_array_equal(kept["Dense_0"]["bias"], base["Dense_0"]["bias"])
    np.testing.assert_array_equal(kept["Dense_1"]["kernel"], base["Dense_1"]["kernel"])
    assert not np.allclose(kept["Dense_0"]["kernel"], base["Dense_0"]["kernel"])


def test_dense_general_and_scanned_kernels_merge_as_their_two_dimensional_layers():
    rng = np.random.default_rng(3)
    base = {"attn": {"query": {"kernel": rng.normal(size=(8, 2, 4)).astype(np.float32)},
                     "out": {"kernel": rng.normal(size=(2, 4, 8)).astype(np.float32)}},
            "scan": {"kernel": rng.normal(size=(3, 8, 5)).astype(np.float32)}}
    experts = experts_of(base, 3)
    merged = sj.merge(base, experts, scan_patterns="scan/*")

    def as_2d(tree):
        flat = {"q/kernel": tree["attn"]["query"]["kernel"].reshape(8, 8),
                "o/kernel": tree["attn"]["out"]["kernel"].reshape(8, 8)}
        flat.update({f"layer{i}/kernel": tree["scan"]["kernel"][i] for i in range(3)})
        return flat

    want = sj.merge(as_2d(base), [as_2d(e) for e in experts])
    for key, value in as_2d(jax.tree_util.tree_map(np.asarray, merged)).items():
        np.testing.assert_allclose(value, want[key], rtol=2e-5, atol=2e-6, err_msg=key)


def test_layers_of_one_shape_run_in_one_vmapped_call_and_chunking_changes_nothing(monkeypatch):
    traced = []

    def counting_swudi(tau, **opts):
        traced.append(tau.shape)  # runs once per trace: once per compiled group call
        return registry.get_method("swudi").fn(tau, **opts)  # its spec's fn takes every default (weight too)

    from swudi_jax.methods import registry

    registry.available_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    base_method = registry.get_method("swudi")
    sj.register(registry.MethodSpec("counting_swudi", counting_swudi, "linear", base_method.defaults, 1.0,
                                     base_method.source, base_method.validate))
    base = flax_model(4)
    experts = experts_of(base, 3)
    merged = sj.merge(base, experts, method="counting_swudi")
    # spectral groups: (8, 6) Dense_0, (8, 8) Dense_1, (6, 8) Dense_2 and Dense_3 stacked together
    assert sorted(traced) == sorted([(3, 8, 6), (3, 8, 8), (3, 6, 8)])
    import swudi_jax.model.merger as tree_module

    calls = []
    real_start_group = tree_module._start_group
    monkeypatch.setattr(tree_module, "_start_group", lambda plans, *a, **k: calls.append(len(plans)) or
                        real_start_group(plans, *a, **k))
    chunked = sj.merge(base, experts, method="counting_swudi", max_group_bytes=1)
    assert len(calls) == len(jax.tree_util.tree_leaves(base)) and set(calls) == {1}  # one leaf per chunk
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(chunked)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(merged["Dense_2"]["kernel"],
                               base["Dense_2"]["kernel"] + np.asarray(sj.swudi(np.stack(
                                   [e["Dense_2"]["kernel"].T - base["Dense_2"]["kernel"].T for e in experts]))).T,
                               rtol=2e-5, atol=2e-6)


def test_merge_group_merges_a_streamed_group_like_merge(golden_model):
    base, experts, want = golden_model
    plans = plan_tree({k: (v.shape, v.dtype) for k, v in base.items()}, layout="torch", method="swudi")
    out = {}
    for group in group_plans(plans, 1 << 20, copies=5):
        out.update(merge_group(group, base, experts, sj.resolve("swudi")))
    for name in NAMES:
        assert rel_err(out[name], want[name]) <= 5e-5


def test_data_methods_receive_each_layers_grams(monkeypatch):
    from swudi_jax.methods import registry

    registry.available_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    sj.register(registry.MethodSpec(  # RegMean's closed form, for the plumbing
        "test_regmean", lambda tau, grams: jnp.linalg.solve(grams.sum(0), jnp.einsum("kmn,knp->mp", tau, grams).T).T,
        "data", {}, 1.0, "Jin et al., ICLR 2023"))
    base = flax_model(5)
    experts = experts_of(base, 2)
    rng = np.random.default_rng(0)
    grams = {}
    for name in ("Dense_0", "Dense_1", "Dense_2", "Dense_3"):
        x = rng.normal(size=(2, 20, base[name]["kernel"].shape[0]))
        grams[f"{name}/kernel"] = np.einsum("kpn,kpq->knq", x, x).astype(np.float32)
    merged = sj.merge(base, experts, method="test_regmean", grams=grams)
    w = [e["Dense_1"]["kernel"].T.astype(np.float64) for e in experts]
    g = grams["Dense_1/kernel"].astype(np.float64)
    want = (w[0] @ g[0] + w[1] @ g[1]) @ np.linalg.inv(g[0] + g[1])
    np.testing.assert_allclose(merged["Dense_1"]["kernel"], want.T, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(merged["Dense_1"]["bias"], np.mean([e["Dense_1"]["bias"] for e in experts], 0), rtol=1e-5)
    with pytest.raises(ValueError, match="Dense_2/kernel.*Gram"):
        sj.merge(base, experts, method="test_regmean", grams={k: v for k, v in grams.items() if "Dense_2" not in k})
    with pytest.raises(ValueError, match=r"grams\['Dense_0/kernel'\] has shape"):
        sj.merge(base, experts, method="test_regmean", grams={**grams, "Dense_0/kernel": grams["Dense_1/kernel"]})


def test_inputs_are_never_modified():
    base = flax_model(6)
    experts = experts_of(base, 3)
    copies = jax.tree_util.tree_map(np.copy, (base, experts))
    for method in ("swudi", "ties_paper"):
        sj.merge(base, experts, method=method)
    for a, b in zip(jax.tree_util.tree_leaves(copies), jax.tree_util.tree_leaves((base, experts))):
        np.testing.assert_array_equal(a, b)


def test_nnx_state_merges_as_a_pure_dict_and_loads_back():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.l1(x))

    model = Model(nnx.Rngs(0))
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    experts = experts_of(jax.tree_util.tree_map(np.asarray, base), 2)
    merged = sj.merge(base, experts, method="average")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model, state)
    want = (experts[0]["l1"]["kernel"] + experts[1]["l1"]["kernel"]) / 2
    np.testing.assert_allclose(model.l1.kernel[...], want, rtol=1e-6)


def test_task_vectors_are_experts_minus_base():
    base = flax_model(7)
    experts = experts_of(base, 2)
    taus = sj.task_vectors(base, experts)
    np.testing.assert_allclose(taus[1]["Dense_0"]["kernel"], experts[1]["Dense_0"]["kernel"] - base["Dense_0"]["kernel"])
    assert int(taus[0]["steps"]) == 0


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def small():
    base = flax_model(8)
    return base, experts_of(base, 3)


def test_a_missing_or_extra_parameter_is_named_with_its_expert(small):
    base, experts = small
    del experts[1]["Dense_2"]["bias"]
    experts[1]["Dense_9"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"expert 1: .*missing 'Dense_2/bias'; extra 'Dense_9/kernel'"):
        sj.merge(base, experts)


def test_shape_and_dtype_mismatches_are_named(small):
    base, experts = small
    experts[2]["Dense_1"]["kernel"] = experts[2]["Dense_1"]["kernel"][:, :4]
    with pytest.raises(ValueError, match=r"expert 2: 'Dense_1/kernel' has shape \(8, 4\), the base has \(8, 8\)"):
        sj.merge(base, experts)
    experts[2]["Dense_1"]["kernel"] = base["Dense_1"]["kernel"].astype(np.float16)
    with pytest.raises(ValueError, match=r"expert 2: 'Dense_1/kernel' has dtype float16, the base has float32"):
        sj.merge(base, experts)


def test_nan_or_inf_is_named_with_path_and_model(small):
    base, experts = small
    experts[0]["Dense_2"]["bias"] = experts[0]["Dense_2"]["bias"].copy()
    experts[0]["Dense_2"]["bias"][3] = np.nan
    with pytest.raises(ValueError, match=r"expert 0: parameter 'Dense_2/bias' contains 1 non-finite"):
        sj.merge(base, experts)
    base = dict(base, LayerNorm_0={"scale": np.full(8, np.inf, np.float32)})
    with pytest.raises(ValueError, match=r"base: parameter 'LayerNorm_0/scale'"):
        sj.merge(base, experts[1:])


def test_fewer_than_two_experts_or_a_non_list_is_refused(small):
    base, experts = small
    with pytest.raises(ValueError, match="at least 2 experts, got 1"):
        sj.merge(base, experts[:1])
    with pytest.raises(ValueError, match="list of pytrees"):
        sj.merge(base, experts[0])


def test_unknown_method_option_or_scale_is_refused_before_compute(small):
    base, experts = small
    with pytest.raises(ValueError, match="unknown merge method 'tie'"):
        sj.merge(base, experts, method="tie")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\] for merge method 'swudi'"):
        sj.merge(base, experts, rank=3)
    with pytest.raises(ValueError, match="scale"):
        sj.merge(base, experts, scale=float("nan"))
    with pytest.raises(ValueError, match="trim='model' needs"):
        plans = plan_tree({"k": ((2, 2), np.float32)}, layout="torch")
        merge_group(plans, {"k": np.zeros((2, 2), np.float32)}, [{"k": np.ones((2, 2), np.float32)}] * 2,
                    sj.resolve("ties_paper"))


def test_float64_models_merge_in_float64_when_x64_is_enabled(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpy as np
        import swudi_jax as sj
        g = np.load(%r)
        names = [k.split("/", 2)[2] for k in g.files if k.startswith("model/base/")]
        base = {n: g["model/base/" + n].astype(np.float64) for n in names}
        experts = [{n: g[f"model/expert{i}/" + n].astype(np.float64) for n in names} for i in range(4)]
        merged = sj.merge(base, experts, layout="torch")
        for n in names:
            want = g["model/swudi_t1300_r0.65/" + n]
            assert merged[n].dtype == np.float64, merged[n].dtype
            # the golden model is the reference's float32 output: agreement stops at its rounding (~3e-8)
            assert np.linalg.norm(merged[n] - want) / np.linalg.norm(want) <= 1e-6, n
        print("ok")
    """) % str(Path(__file__).parent / "data" / "golden.npz")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
