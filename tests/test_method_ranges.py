"""Every option's range is checked before any compute (API, per expert, per tensor, config), and an
eager layer function refuses a non-finite result (issue 20, items 13 and 17)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swudi_jax as sj
from swudi_jax.checkpoint.config import ConfigError, parse_config
from swudi_jax.maths import filters
from swudi_jax.methods import mergekit_family as mf
from swudi_jax.methods import registry


@pytest.mark.parametrize("name, options, message", [
    ("ties", {"density": -0.1}, r"density must lie in \[0.0, 1.0\]"),
    ("ties", {"density": [0.5, 1.5]}, r"density must lie in \[0.0, 1.0\]"),
    ("della", {"density": 0.5, "epsilon": 0.6}, r"density ± epsilon lies in \(0, 1\)"),
    ("della_linear", {"density": [0.5, 0.3], "epsilon": [0.1, 0.3]}, r"models \[1\]"),
    ("della", {"epsilon": -0.1}, r"epsilon must be >= 0.0"),
    ("task_arithmetic", {"lam": float("nan")}, r"lambda must be finite"),
    ("dare_ties", {"weight": [1.0, float("inf")]}, r"weight must be finite"),
    ("breadcrumbs", {"gamma": 1.5}, r"gamma must lie in \[0.0, 1.0\]"),
    ("ties", {"normalize": "yes"}, r"normalize must be true or false"),
    ("ties", {"rescale": "keep_prob"}, r"keep_prob.*random sparsifiers"),
    ("dare_linear", {"seed": -1}, r"seed must be >= 0"),
    ("ties", {"density": "0.5"}, r"density must be a number"),
])
def test_family_options_out_of_range_are_refused_at_resolve(name, options, message):
    with pytest.raises(ValueError, match=message):
        registry.resolve_options(name, options)


def test_della_epsilon_is_free_where_density_is_one_or_zero():
    registry.resolve_options("della", {"density": [1.0, 0.0], "epsilon": 0.6})  # no sparsification there


def _pytree(seed=0, n=2):
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    return base, [{"w": base["w"] + 0.1 * rng.normal(size=(4, 3)).astype(np.float32)} for _ in range(n)]


def test_merge_refuses_nan_lambda_and_bad_per_tensor_values_naming_the_tensor():
    base, experts = _pytree()
    with pytest.raises(ValueError, match="lambda must be finite"):
        sj.merge(base, experts, "task_arithmetic", lam=float("nan"))
    # per-tensor values reach the method through its leaf inputs, checked there with the tensor's path
    with pytest.raises(ValueError, match=r"'w'.*density ± epsilon"):
        sj.merge(base, experts, "della", epsilon=0.6, tensor_options=lambda path, layer: {"density": 0.5})
    with pytest.raises(ValueError, match=r"'w'.*lambda must be finite"):
        sj.merge(base, experts, "task_arithmetic", tensor_options=lambda path, layer: {"lam": float("nan")})
    merged = sj.merge(base, experts, "della", epsilon=0.1, tensor_options=lambda path, layer: {"density": 0.5})
    assert np.isfinite(np.asarray(merged["w"])).all()


@pytest.mark.parametrize("parameters, message", [
    ({"lambda": [1.0, float("nan")]}, "lambda must be finite"),
    ({"density": -0.1}, "density must lie in"),
    ({"density": 0.5, "epsilon": 0.6}, r"density ± epsilon"),
])
def test_config_refuses_out_of_range_values_before_reading_any_tensor(tmp_path, parameters, message):
    method = "della" if "epsilon" in parameters else "ties"
    for name in ("base", "e0", "e1"):
        (tmp_path / name).mkdir()
    raw = {"models": ["e0", "e1"], "base_model": "base", "merge_method": method, "parameters": parameters}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, base_dir=tmp_path)


def test_family_members_are_one_factory_whose_signature_is_the_spec():
    for member in mf.FAMILY:
        spec = registry.get_method(member.name)
        assert spec.fn is member and spec.defaults == member.defaults
        params = inspect.signature(member).parameters
        assert list(params)[1:] == [*member.defaults, *member.inputs]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[1:])
    with pytest.raises(TypeError, match="gamma"):
        mf.ties(jnp.ones((2, 3)), gamma=0.1)  # not an option of ties


def test_eager_layer_functions_refuse_an_overflowed_result_and_jit_is_left_alone():
    tau = np.random.default_rng(0).normal(size=(3, 8, 6)).astype(np.float32) * 1e30  # finite, ‖τ‖² is not
    for fn in (sj.swudi, sj.swudi_a, sj.pinv_merge, sj.iwudi):
        with pytest.raises(ValueError, match=r"non-finite value\(s\).*overflowed in float32.*e\+30"):
            fn(tau)
    assert np.isnan(np.asarray(jax.jit(sj.swudi)(tau))).any()  # traced: returned unchecked
    small = tau * 1e-30
    np.testing.assert_array_equal(np.asarray(sj.swudi(small)), np.asarray(jax.jit(sj.swudi)(small)))


def test_aligned_exponential_matches_numpy():
    lam = np.array([1e-8, 0.5, 2.0, 4.0], np.float32)
    h = np.asarray(filters.aligned_exponential(3.0, 0.5, 9.0)(jnp.asarray(lam)))
    want = 1.0 - np.exp(-lam.astype(np.float64) * 3.0 * (9.0 / 4.0) ** 0.5)
    np.testing.assert_allclose(h, want, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="alignment"):
        filters.aligned_exponential(3.0, -1.0, 9.0)
