"""RegMean: the closed form against its weight-space formula and the least-squares problem it solves."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from swudi_jax import output_space_qp, regmean, residual_energy_score
from swudi_jax.methods.regmean import scale_off_diagonal
from swudi_jax.methods.registry import get_method, resolve_options


def problem(seed=0, n_tasks=3, m=4, n=6, tokens=25):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(m, n))
    experts = base + rng.normal(size=(n_tasks, m, n))
    xs = [rng.normal(size=(n, tokens)) * (1 + k) for k in range(n_tasks)]
    return base, experts, xs, np.stack([x @ x.T for x in xs])


def test_task_vector_form_equals_the_weight_space_formula():
    base, experts, _, grams = problem()
    with jax.enable_x64(True):
        merged_tau = np.asarray(regmean(experts - base, grams, alpha=0.95))
    scaled = [0.95 * g + 0.05 * np.diag(np.diag(g)) for g in grams]
    weight = sum(w @ g for w, g in zip(experts, scaled)) @ np.linalg.inv(sum(scaled))
    np.testing.assert_allclose(base + merged_tau, weight, rtol=1e-12, atol=1e-12)


def test_alpha_scales_only_the_off_diagonal_entries():
    _, _, _, grams = problem(1)
    scaled = np.asarray(scale_off_diagonal(grams.astype(np.float32), 0.5))
    np.testing.assert_allclose(np.diagonal(scaled, axis1=1, axis2=2), np.diagonal(grams, axis1=1, axis2=2), rtol=1e-6)
    off = ~np.eye(grams.shape[-1], dtype=bool)
    np.testing.assert_allclose(scaled[:, off], 0.5 * grams[:, off], rtol=1e-6)


def test_alpha_one_is_the_least_squares_fit_of_every_task_output():
    base, experts, xs, grams = problem(2)
    tau = experts - base
    # min_Δ Σk ‖Δ Xk − Δk Xk‖²: one least-squares problem over the concatenated tokens.
    design = np.concatenate([x.T for x in xs])
    target = np.concatenate([(t @ x).T for t, x in zip(tau, xs)])
    expected = np.linalg.lstsq(design, target, rcond=None)[0].T
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(regmean(tau, grams, alpha=1.0)), expected, rtol=1e-12, atol=1e-12)


def test_regmean_rho_is_at_least_the_diagonal_qp_rho():
    for seed in range(3):
        base, experts, _, grams = problem(seed)
        tau = experts - base
        with jax.enable_x64(True):
            _, rho_qp = output_space_qp(tau, grams, ridge=0.0)
            _, rho_energy = output_space_qp(tau, grams, basis="energy", ridge=0.0)
            rho_regmean = residual_energy_score(regmean(tau, grams, alpha=1.0), tau, grams)
            assert float(rho_regmean) >= float(rho_qp) - 1e-12
            assert float(rho_regmean) >= float(rho_energy) - 1e-12
            assert float(rho_regmean) <= 1.0


def test_input_features_no_task_sees_take_the_mean_task_vector():
    base, experts, xs, _ = problem(3)
    xs = [np.concatenate([x[:4], np.zeros((2, x.shape[1]))]) for x in xs]  # features 4, 5 never fire
    grams = np.stack([x @ x.T for x in xs]).astype(np.float32)
    tau = (experts - base).astype(np.float32)
    merged = np.asarray(regmean(tau, grams))
    assert np.all(np.isfinite(merged))
    np.testing.assert_allclose(merged[:, 4:], tau.mean(0)[:, 4:], rtol=1e-5, atol=1e-6)


def test_registered_as_a_data_method_with_the_reference_alpha():
    method = get_method("regmean")
    assert method.kind == "data" and method.defaults["alpha"] == 0.95
    with pytest.raises(ValueError, match="alpha"):
        resolve_options("regmean", {"alpha": 1.5})
    base, experts, _, grams = problem(4)
    tau = (experts - base).astype(np.float32)
    np.testing.assert_allclose(np.asarray(method.fn(tau, grams.astype(np.float32), **method.defaults)),
                               np.asarray(regmean(tau, grams.astype(np.float32))), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"alpha": -0.1}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"ridge": -1.0}, "ridge"),
     ({"weights": np.ones(2)}, "weights")],
)
def test_bad_options_are_value_errors(kwargs, message):
    base, experts, _, grams = problem(5)
    with pytest.raises(ValueError, match=message):
        regmean(experts - base, grams, **kwargs)


def test_grams_of_the_wrong_input_size_are_a_value_error():
    base, experts, _, grams = problem(6)
    with pytest.raises(ValueError, match=r"grams must have shape \(K, n, n\) = \(3, 6, 6\)"):
        regmean(experts - base, grams[:, :5, :5])


def test_alpha_one_without_ridge_on_too_few_tokens_names_the_layer():
    rng = np.random.default_rng(7)
    tau = rng.normal(size=(2, 3, 8))
    xs = [rng.normal(size=(8, 3)) for _ in range(2)]  # 6 tokens for 8 input features
    grams = np.stack([x @ x.T for x in xs])
    with pytest.raises(ValueError, match="encoder/fc1: the sum of the input Grams is singular.*ridge > 0"):
        regmean(tau, grams, alpha=1.0, layer="encoder/fc1")
    for options in ({"alpha": 0.95}, {"alpha": 1.0, "ridge": 1e-6}):
        assert np.all(np.isfinite(np.asarray(regmean(tau, grams, **options))))
