"""Typical mergekit configs, written as mergekit users write them, run by swudi-merge on small
Llama-shaped checkpoints; each result is checked tensor by tensor against the independent
NumPy transcription of the method (tests/mergekit_reference.py)."""

from __future__ import annotations

import mergekit_reference as ref
import numpy as np
import pytest
from mergekit_checkpoints import f64, family, layer_t, run

from swudi_jax.methods import sparsify as sp
from swudi_jax.methods.dare import leaf_key


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_configs")
    return root, {k: f64(v) for k, v in family(root).items()}


def check(got, want_fn, names, rtol=1e-5, atol=1e-6):
    assert set(got) == set(names)
    for name in names:
        np.testing.assert_allclose(np.asarray(got[name], np.float64), want_fn(name), rtol=rtol, atol=atol,
                                   err_msg=name)


def tau(m, name, experts=("e0", "e1", "e2")):
    return np.stack([m[e][name] - m["base"][name] for e in experts])


def test_slerp_with_the_classic_filtered_t_gradient(models):
    root, m = models
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    config = {
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 3]}, {"model": "e0", "layer_range": [0, 3]}]}],
        "merge_method": "slerp",
        "base_model": "base",
        "parameters": {"t": [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp},
                             {"value": 0.5}]},
        "dtype": "float32",
    }
    got = run(root, config, "slerp")

    def want(name):
        grid = np.linspace(0, 1, 5)
        t = np.interp(layer_t(name), grid, attn) if "self_attn" in name else (
            np.interp(layer_t(name), grid, mlp) if "mlp" in name else 0.5)
        return ref.slerp(t, m["base"][name], m["e0"][name]).reshape(m["base"][name].shape)

    check(got, want, m["base"])


def test_task_arithmetic_with_weights_and_the_base_listed_among_the_models(models):
    root, m = models
    config = {"models": [{"model": "base"}, {"model": "e0", "parameters": {"weight": 0.7}},
                         {"model": "e1", "parameters": {"weight": 0.3}}],
              "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.9},
              "dtype": "float32"}
    got = run(root, config, "ta")  # the base among the models is the base, as in mergekit (a note, no warning)
    check(got, lambda n: m["base"][n] + ref.task_family("task_arithmetic", tau(m, n, ("e0", "e1")), [0.7, 0.3],
                                                          lam=0.9), m["base"])


def test_ties_with_per_model_density_and_weight(models):
    root, m = models
    config = {"models": [{"model": "e0", "parameters": {"density": 0.5, "weight": 0.5}},
                         {"model": "e1", "parameters": {"density": 0.3, "weight": 0.3}},
                         {"model": "e2", "parameters": {"density": 0.7, "weight": 0.2}}],
              "merge_method": "ties", "base_model": "base", "parameters": {"normalize": True, "int8_mask": True},
              "dtype": "float32"}
    got = run(root, config, "ties")
    check(got, lambda n: m["base"][n] + ref.task_family("ties", tau(m, n), [0.5, 0.3, 0.2], [0.5, 0.3, 0.7]),
          m["base"])


def test_dare_ties_against_the_same_uniforms(models):
    root, m = models
    config = {"models": [{"model": "e0", "parameters": {"density": 0.53, "weight": 0.4}},
                         {"model": "e1", "parameters": {"density": 0.53, "weight": 0.6}}],
              "merge_method": "dare_ties", "base_model": "base", "parameters": {"int8_mask": True},
              "dtype": "float32"}
    got = run(root, config, "dare_ties")

    def want(name):
        t = tau(m, name, ("e0", "e1"))
        u = np.asarray(sp.draw_uniforms(leaf_key(0, name, 0), t.shape), np.float64)
        return m["base"][name] + ref.task_family("dare_ties", t, [0.4, 0.6], [0.53, 0.53], uniforms=u)

    check(got, want, m["base"])


def test_model_stock_linear_and_karcher(models):
    root, m = models
    got = run(root, {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}], "merge_method": "model_stock",
                     "base_model": "base", "dtype": "float32"}, "model_stock")
    check(got, lambda n: ref.model_stock(m["base"][n], [m[e][n] for e in ("e0", "e1", "e2")]), m["base"])
    # linear needs no base: a weighted soup of the models
    got = run(root, {"models": [{"model": "e0", "parameters": {"weight": 1.0}},
                                {"model": "e1", "parameters": {"weight": 0.5}},
                                {"model": "e2", "parameters": {"weight": 0.25}}], "merge_method": "linear",
                     "dtype": "float32"}, "linear")
    check(got, lambda n: ref.linear([m[e][n] for e in ("e0", "e1", "e2")], [1.0, 0.5, 0.25]), m["base"])
    got = run(root, {"models": [{"model": "e0"}, {"model": "e1"}], "merge_method": "karcher", "dtype": "float32"},
              "karcher")
    check(got, lambda n: ref.karcher([m["e0"][n], m["e1"][n]]), m["base"], rtol=1e-4, atol=1e-5)


def test_breadcrumbs_sce_and_nuslerp(models):
    root, m = models
    got = run(root, {"models": [{"model": "e0", "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.05}},
                                {"model": "e1", "parameters": {"weight": 0.4, "density": 0.6, "gamma": 0.1}}],
                     "merge_method": "breadcrumbs", "base_model": "base", "dtype": "float32"}, "breadcrumbs")
    check(got, lambda n: m["base"][n] + ref.task_family("breadcrumbs", tau(m, n, ("e0", "e1")), [0.6, 0.4],
                                                          [0.8, 0.6], gammas=[0.05, 0.1]), m["base"])
    got = run(root, {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}], "merge_method": "sce",
                     "base_model": "base", "parameters": {"select_topk": 0.7}, "dtype": "float32"}, "sce")
    check(got, lambda n: m["base"][n] + ref.sce(tau(m, n), 0.7), m["base"])
    got = run(root, {"models": [{"model": "e0", "parameters": {"weight": 0.3}},
                                {"model": "e1", "parameters": {"weight": 0.7}}],
                     "merge_method": "nuslerp", "base_model": "base", "dtype": "float32"}, "nuslerp")
    check(got, lambda n: ref.nuslerp([m["e0"][n], m["e1"][n]], [0.3, 0.7], base=m["base"][n]), m["base"])
