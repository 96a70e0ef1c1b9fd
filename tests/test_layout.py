"""Leaf plans: kinds, patterns, maths layout round trips and grouping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swudi_jax.model.layout import (
    WUDI_VIT_SCOPE,
    group_plans,
    path_matches,
    plan_leaf,
    to_maths,
)

F32 = np.float32


def kind(path, shape, dtype=F32, **kw):
    return plan_leaf(path, shape, dtype, **kw).kind


def test_flax_kernel_is_transposed_to_outputs_by_inputs():
    plan = plan_leaf("Dense_0/kernel", (3, 5), F32, layout="flax")
    assert plan.kind == "linear" and plan.maths_shape == (5, 3)
    x = np.arange(15, dtype=F32).reshape(1, 3, 5)
    np.testing.assert_array_equal(to_maths(plan, x)[0, 0], x[0].T)


def test_torch_weight_is_already_maths_layout():
    plan = plan_leaf("layers.0.mlp.weight", (5, 3), F32, layout="torch")
    assert plan.kind == "linear" and plan.maths_shape == (5, 3)
    x = np.arange(15, dtype=F32).reshape(1, 5, 3)
    np.testing.assert_array_equal(to_maths(plan, x)[0, 0], x[0])


def test_leaf_kinds_follow_the_reference_rules():
    assert kind("embed.weight", (30, 16), layout="torch") == "linear"
    assert kind("Embed_0/embedding", (30, 16)) == "linear"
    assert kind("lm_head.weight", (30, 16), layout="torch") == "mean"
    assert kind("blocks.0.attn.bias", (16,), layout="torch") == "mean"
    assert kind("LayerNorm_0/scale", (16,)) == "mean"
    assert kind("Conv_0/kernel", (3, 3, 4, 8)) == "mean"
    assert kind("conv.weight", (8, 4, 3, 3), layout="torch") == "mean"
    assert kind("step", (), np.int32) == "passthrough"
    assert kind("mask", (4,), np.bool_) == "passthrough"
    assert kind("Dense_0/kernel", (4, 4), exclude="Dense_0*") == "keep"
    assert kind("Dense_0/bias", (4,), exclude=["re:bias$"]) == "keep"
    assert kind("head/kernel", (4, 4), head_patterns=["head/*"]) == "mean"
    assert kind("Dense_0/kernel", (4, 4), include=["Dense_1/*"]) == "mean"
    assert kind("Dense_0/kernel", (4, 4), include=["Dense_1/*"], others="keep") == "keep"


def test_glob_matches_the_path_or_a_tail_after_a_separator_and_re_searches():
    assert path_matches("model.lm_head.weight", "lm_head*")
    assert path_matches("enc/layer_0/attn/out/kernel", "out/kernel")
    assert not path_matches("enc/layer_0/attn/about/kernel", "out/kernel")
    assert path_matches("a/b/c", "a/*")
    assert path_matches("x.mlp.fc1.weight", "re:mlp\\.fc[12]")
    assert not path_matches("x.mlp.fc3.weight", "re:mlp\\.fc[12]")
    with pytest.raises(ValueError, match="regular expression"):
        plan_leaf("a", (2, 2), F32, exclude="re:(")
    with pytest.raises(ValueError, match="exclude"):
        plan_leaf("a", (2, 2), F32, exclude=[3])


def test_dense_general_kernels_fold_their_input_axes():
    query = plan_leaf("attn/query/kernel", (8, 2, 4), F32)
    out = plan_leaf("attn/out/kernel", (2, 4, 8), F32)
    assert (query.kind, query.maths_shape, query.input_axes) == ("linear", (8, 8), 1)
    assert (out.kind, out.maths_shape, out.input_axes) == ("linear", (8, 8), 2)
    x = np.random.default_rng(0).normal(size=(1, 8, 2, 4)).astype(F32)
    np.testing.assert_array_equal(to_maths(query, x)[0, 0], x[0].reshape(8, 8).T)
    custom = plan_leaf("proj/kernel", (6, 2, 3), F32, input_axes={"proj/kernel": 1})
    assert custom.maths_shape == (6, 6)
    assert kind("proj/kernel", (6, 2, 3)) == "mean"  # unknown DenseGeneral: not guessed


def test_scanned_kernels_are_stacks_of_layers():
    plan = plan_leaf("blocks/Dense_0/kernel", (5, 3, 4), F32, scan_patterns="blocks/*")
    assert plan.kind == "linear" and plan.layers == 5 and plan.maths_shape == (4, 3)
    x = np.random.default_rng(1).normal(size=(2, 5, 3, 4)).astype(F32)
    maths = to_maths(plan, x)
    assert maths.shape == (5, 2, 4, 3)
    np.testing.assert_array_equal(maths[3, 1], x[1, 3].T)
    moved = plan_leaf("blocks/Dense_0/kernel", (3, 5, 4), F32, scan_patterns="blocks/*", scan_axis=1)
    assert moved.layers == 5 and moved.maths_shape == (4, 3)


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from(["flax", "torch"]),
    dims=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    scanned=st.booleans(),
    n_in=st.integers(1, 3),
)
def test_to_maths_then_from_maths_is_the_identity(layout, dims, scanned, n_in):
    shape = tuple(dims)
    inner_ndim = len(shape) - scanned
    plan = plan_leaf("m/x/kernel" if layout == "flax" else "m.x.weight", shape, F32, layout=layout,
                     scan_patterns="m*" if scanned else None, input_axes={"x/kernel": min(n_in, max(inner_ndim - 1, 1))})
    x = np.random.default_rng(2).normal(size=(3, *shape)).astype(F32)
    if plan.kind != "linear":
        assert inner_ndim != 2
        return
    maths = to_maths(plan, x)
    assert maths.shape == (plan.layers, 3, *plan.maths_shape)
    for i in range(3):
        np.testing.assert_array_equal(plan.from_maths(maths[:, i]), x[i])


def test_wudi_vit_scope_merges_only_attention_and_mlp_matrices():
    spectral = ["visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.out_proj.weight",
                "visual.transformer.resblocks.0.mlp.c_fc.weight", "vision_model.encoder.layers.1.self_attn.k_proj.weight",
                "vision_model.encoder.layers.1.mlp.fc2.weight"]
    kept = ["visual.conv1.weight", "visual.proj", "visual.transformer.resblocks.0.ln_1.weight",
            "vision_model.embeddings.position_embedding.weight"]
    for path in spectral:
        assert kind(path, (12, 4), layout="torch", **WUDI_VIT_SCOPE) == "linear", path
    for path in kept:
        assert kind(path, (12, 4), layout="torch", **WUDI_VIT_SCOPE) == "keep", path


def test_groups_hold_one_shape_each_and_chunk_by_bytes():
    plans = [plan_leaf(f"l{i}/kernel", (4, 8), F32) for i in range(5)]
    plans += [plan_leaf("l5/kernel", (8, 4), F32), plan_leaf("l0/bias", (8,), F32), plan_leaf("n", (), np.int32)]
    groups = group_plans(plans)
    assert [len(g) for g in groups] == [5, 1, 1, 1]
    assert sorted(p.path for g in groups for p in g) == sorted(p.path for p in plans)
    chunked = group_plans(plans, max_group_bytes=3 * 4 * 8 * 4 * 2, copies=3)
    assert [len(g) for g in chunked] == [2, 2, 1, 1, 1, 1]
    assert all(len({p.group for p in g}) == 1 for g in chunked)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        plan_leaf("a/kernel", (2, 2), F32, layout="jax")


def test_layout_is_inferred_from_leaf_names():
    from swudi_jax.model.layout import infer_layout
    from swudi_jax.model.merger import plan_tree

    assert infer_layout(["Dense_0/kernel", "Dense_0/bias"]) == "flax"
    assert infer_layout(["model.layers.0.mlp.up_proj.weight"]) == "torch"
    with pytest.raises(ValueError, match="cannot infer the layout"):
        infer_layout(["a/b"])
    plans = plan_tree({"Dense_0/kernel": ((3, 5), F32), "x.weight": ((4, 2), F32)}, layout="auto")
    assert [p.maths_shape for p in plans] == [(5, 3), (4, 2)]


def test_to_maths_and_from_maths_keep_numpy_on_the_host_and_agree_with_jax():
    import jax.numpy as jnp

    plan = plan_leaf("blocks/attn/out/kernel", (3, 2, 4, 5), F32, layout="flax", scan_patterns="blocks*")
    x = np.random.default_rng(3).normal(size=(2, 3, 2, 4, 5)).astype(F32)  # (N, layers, heads, dim, out)
    host, device = to_maths(plan, x), to_maths(plan, jnp.asarray(x))
    assert isinstance(host, np.ndarray) and not isinstance(device, np.ndarray)
    # reference: layer l of expert i is the (in = heads·dim, out) kernel, transposed to (out, in)
    want = np.stack([[x[i, l].reshape(8, 5).T for i in range(2)] for l in range(3)])
    np.testing.assert_array_equal(host, want)
    np.testing.assert_array_equal(np.asarray(device), want)
    back = plan.from_maths(host[:, 1])
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, x[1])


def test_auto_layout_takes_the_fallback_only_when_the_names_do_not_tell():
    from swudi_jax.model.layout import LeafRules

    rules = LeafRules(layout="auto")
    assert rules.for_paths(["a/b"], fallback="torch").layout == "torch"
    assert rules.for_paths(["Dense_0/kernel"], fallback="torch").layout == "flax"
    assert LeafRules(layout="flax").for_paths(["x.weight"], fallback="torch").layout == "flax"
    with pytest.raises(ValueError, match="cannot infer the layout"):
        rules.for_paths(["a/b"])
