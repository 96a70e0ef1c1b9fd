"""The equivalence proofs of MATH.md §5, in float64: gradient descent on WUDI's loss *is* a
spectral filter, and every estimator equals the NumPy float64 transcription of its formula.

x64 is switched on inside each test only (``jax.enable_x64(True)`` as a context), so the
rest of the suite keeps JAX's float32 default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_task_vectors, rel_err, tau64
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_reference as ref
import swudi_jax as sj
from swudi_jax.maths import filters
from swudi_jax.maths.spectral import gram_gradient

RULES = sorted(ref.RANK_RULES)
SHAPE_LIST = [(4, 6, 10), (3, 2, 9), (5, 9, 3), (2, 1, 7)]
"""(N, m, n): C full rank, C rank-deficient (N·m < n), a tall layer, a single output row.
A few fixed shapes let the compiled functions be reused across examples and tests."""


def stable_step(tau: np.ndarray, fraction: float) -> float:
    """η = fraction / λ_max, so that |1 − 2ηλ| < 1 on the whole spectrum."""
    return fraction / float(ref.clamped_spectrum(tau)[0].max())


# -------------------------------------------------- gradient descent is the Landweber filter


@pytest.mark.parametrize("shape", SHAPE_LIST)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 1000), fraction=st.floats(0.05, 0.9), steps=st.integers(1, 60))
def test_sgd_steps_equal_the_landweber_filter(shape, seed, fraction, steps):
    with jax.enable_x64(True):
        tau = tau64(seed, shape)
        eta = stable_step(tau, fraction)
        landweber = sj.spectral_merge(tau, filters.landweber(eta, steps))
        for gradient in ("reference", "gram"):
            gd = sj.wudi_gd(tau, optimizer=optax.sgd(eta), steps=steps, gradient=gradient)
            assert gd.dtype == jnp.float64
            assert rel_err(gd, landweber) <= 1e-12, gradient
        assert rel_err(landweber, ref.gradient_descent(tau, eta, steps)[-1]) <= 1e-12


def test_sgd_trajectory_matches_landweber_at_every_snapshot():
    with jax.enable_x64(True):
        tau = tau64(3, (4, 6, 10))
        eta, steps, every = stable_step(tau, 0.6), 20, 3
        final, trajectory = sj.wudi_gd(tau, optimizer=optax.sgd(eta), steps=steps, gradient="gram",
                                       trajectory_every=every)
        assert trajectory.shape == (steps // every + 1, 6, 10)
        lam = ref.clamped_spectrum(tau)[0]
        for i, theta in enumerate(trajectory):
            landweber = ref.filtered_estimator(tau, ref.landweber(lam, eta, i * every))
            assert rel_err(theta, landweber) <= 1e-12
        assert rel_err(final, sj.spectral_merge(tau, filters.landweber(eta, steps))) <= 1e-12
        np.testing.assert_array_equal(trajectory[0], tau.sum(0))


def test_sgd_with_the_halved_gradient_is_the_halved_landweber_filter():
    with jax.enable_x64(True):
        tau = tau64(4, (4, 6, 10))
        eta, steps = stable_step(tau, 0.5), 15
        # optax.sgd(η/2) on ∇L = 2(θC − D) is sgd(η) on θC − D
        gd = sj.wudi_gd(tau, optimizer=optax.sgd(eta / 2), steps=steps, gradient="gram")
        assert rel_err(gd, sj.spectral_merge(tau, filters.landweber(eta, steps, halved=True))) <= 1e-12


# ------------------------------------------------ small steps approach the exponential filter


def test_gradient_descent_approaches_the_exponential_filter_with_error_proportional_to_eta():
    with jax.enable_x64(True):
        tau = tau64(5, (4, 6, 10))
        t = 3.0
        flow = sj.spectral_merge(tau, filters.exponential(t))
        errors = []
        for steps in (100, 200, 400):
            eta = t / (2 * steps)  # t = 2ηk
            errors.append(rel_err(sj.wudi_gd(tau, optimizer=optax.sgd(eta), steps=steps, gradient="gram"), flow))
        assert errors[0] < 1e-2
        for coarse, fine in zip(errors, errors[1:]):
            assert 1.9 < coarse / fine < 2.1  # halving η halves the error: O(η)


# ------------------------------------------------------------------- both gradient forms


@pytest.mark.parametrize("optimizer", [optax.adam(1e-3), optax.sgd(1e-2, momentum=0.9)], ids=["adam", "momentum"])
def test_reference_and_gram_gradients_give_the_same_iterates(optimizer):
    with jax.enable_x64(True):
        tau = tau64(6, (4, 6, 10))
        ref_form = sj.wudi_gd(tau, optimizer=optimizer, steps=25, gradient="reference")
        gram_form = sj.wudi_gd(tau, optimizer=optimizer, steps=25, gradient="gram")
        assert rel_err(ref_form, gram_form) <= 1e-12


def test_gram_gradient_is_the_autodiff_gradient_of_the_wudi_loss():
    with jax.enable_x64(True):
        tau = jnp.asarray(tau64(7, (4, 6, 10)))
        theta = jnp.asarray(np.random.default_rng(0).normal(size=(6, 10)))
        eq = sj.normal_equation(tau)
        autodiff = jax.jit(jax.grad(sj.wudi_loss))(theta, tau)
        assert rel_err(gram_gradient(theta, eq.c, eq.d), autodiff) <= 1e-12
        assert abs(float(sj.wudi_loss(theta, tau)) - ref.wudi_loss(np.asarray(theta), np.asarray(tau))) \
            <= 1e-12 * ref.wudi_loss(np.asarray(theta), np.asarray(tau))


# ----------------------------------------------------------------------- limits of SWUDI


@pytest.mark.parametrize("init,ratio", [("sum", 0.3), ("mean", 1.0), ("zero", 0.65)])
def test_time_zero_gives_the_anchor(init, ratio):
    with jax.enable_x64(True):
        tau = tau64(8, (4, 6, 10))
        np.testing.assert_allclose(sj.swudi(tau, time=0.0, rank_ratio=ratio, init=init), ref.anchor(tau, init),
                                   rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape,tol", [((4, 6, 10), 1e-12), ((3, 2, 9), 1e-6)],
                         ids=["full-rank-C", "rank-deficient-C"])
def test_infinite_time_with_full_rank_gives_the_pseudo_inverse(shape, tol):
    # where C is rank-deficient the pseudo-inverse divides the rounding left in C's null
    # directions by the 1e-8 clamp, so the two agree only to ~1e-8 there
    with jax.enable_x64(True):
        tau = tau64(9, shape)
        pinv = sj.pinv_merge(tau)
        errors = [rel_err(sj.swudi(tau, time=t, rank_ratio=1.0), pinv) for t in (10.0, 1e6)]
        assert errors[0] > 1e3 * errors[1]
        assert errors[1] <= tol
        assert rel_err(pinv, ref.pinv(tau)) <= tol


@pytest.mark.parametrize("shape,k,rule", [((4, 6, 10), 1, "participation_sqrt"), ((4, 6, 10), 7, "gavish_donoho"),
                                          ((3, 2, 9), 8, "entropy")])
def test_hard_swudi_with_k_equals_swudi_a_forced_to_k(shape, k, rule):
    # (3, 2, 9): rank C = 6, so K = 8 also keeps two directions at the 1e-8 clamp
    with jax.enable_x64(True):
        tau = tau64(k, shape)
        hard = sj.spectral_merge(tau, filters.top_k(k))
        forced = dict(rank_rule=rule, min_rank=k, max_rank_ratio=k / shape[2])
        assert int(sj.swudi_a_rank(tau, **forced)) == k
        assert rel_err(sj.swudi_a(tau, **forced), hard) <= 1e-12
        clamped = k > min(shape[0] * shape[1], shape[2])  # K > rank C: directions at the clamp
        assert rel_err(hard, ref.filtered_estimator(tau, ref.top_k(ref.clamped_spectrum(tau)[0], k))) \
            <= (1e-6 if clamped else 1e-11)


# ------------------------------------------------------ equality with the NumPy transcription


@pytest.mark.parametrize("shape,init", list(zip(SHAPE_LIST, ["sum", "mean", "zero", "sum"])))
def test_smooth_filter_estimators_equal_the_numpy_float64_transcription(shape, init):
    with jax.enable_x64(True):
        tau = tau64(sum(shape), shape)
        # h/λ reaches t = 1300 on small λ and scales the rounding with it (~1e-13)
        assert rel_err(sj.swudi(tau, init=init), ref.swudi(tau, init=init)) <= 1e-11
        lam = ref.clamped_spectrum(tau)[0]
        assert rel_err(sj.spectral_merge(tau, filters.tikhonov(0.05), init=init),
                       ref.filtered_estimator(tau, ref.tikhonov(lam, 0.05), init)) <= 1e-12


@pytest.mark.parametrize("shape", SHAPE_LIST)
def test_hard_filter_estimators_equal_the_numpy_float64_transcription(shape):
    # where C is rank-deficient the pseudo-inverse keeps directions at the 1e-8 clamp, where C⁺
    # amplifies rounding: 1e-6 there; SWUDI-A's K stays within rank C on these inputs
    with jax.enable_x64(True):
        tau = tau64(sum(shape), shape)
        rank_deficient = shape[0] * shape[1] < shape[2]
        assert rel_err(sj.pinv_merge(tau), ref.pinv(tau)) <= (1e-6 if rank_deficient else 1e-11)
        for rule in RULES if shape == SHAPE_LIST[0] else ["participation_sqrt", "gavish_donoho"]:
            assert int(sj.swudi_a_rank(tau, rank_rule=rule)) == ref.swudi_a_rank(tau, rule), rule
            assert rel_err(sj.swudi_a(tau, rank_rule=rule), ref.swudi_a(tau, rule)) <= 1e-11, rule


@pytest.mark.parametrize("init", ["sum", "mean", "zero"])
def test_gradient_descent_from_each_init_is_landweber_from_that_anchor(init):
    with jax.enable_x64(True):
        tau = tau64(10, (4, 6, 10))
        eta, steps = stable_step(tau, 0.4), 12
        gd = sj.wudi_gd(tau, optimizer=optax.sgd(eta), steps=steps, init=init, gradient="gram")
        assert rel_err(gd, sj.spectral_merge(tau, filters.landweber(eta, steps), init=init)) <= 1e-12
        assert rel_err(gd, ref.gradient_descent(tau, eta, steps, init)[-1]) <= 1e-12


# --------------------------------------------------------------------------- vmap'd stacks


def test_vmapped_stack_of_layers_equals_a_python_loop():
    with jax.enable_x64(True):
        stack = np.stack([tau64(s, (4, 6, 10)) for s in range(3)])  # (L, N, m, n)
        calls = {
            "swudi": sj.swudi,
            "swudi_a": lambda t: sj.swudi_a(t, rank_rule="entropy"),
            "pinv": sj.pinv_merge,
            "landweber": lambda t: sj.spectral_merge(t, filters.landweber(0.05, 10)),
            "wudi_gd": lambda t: sj.wudi_gd(t, steps=20, gradient="gram"),
        }
        for name, call in calls.items():
            batched = jax.jit(jax.vmap(call))(stack)
            assert batched.shape == (3, 6, 10) and batched.dtype == jnp.float64
            for layer in range(3):
                assert rel_err(batched[layer], call(stack[layer])) <= 1e-12, name


# ---------------------------------------------------------- degenerate input, dtypes, purity


@pytest.mark.parametrize("scale", [0.0, 1e-8], ids=["zero", "below-norm-floor"])
def test_negligible_task_vectors_give_their_mean_without_nan(scale):
    tau = (scale * random_task_vectors(11, 4, 6, 10)).astype(np.float32)
    mean = tau.mean(0)
    for out in (sj.swudi(tau), sj.swudi_a(tau), sj.pinv_merge(tau), sj.wudi_gd(tau),
                sj.spectral_merge(tau, filters.exponential(10.0)), sj.swudi(tau, init="zero")):
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, mean, rtol=1e-6, atol=0)


def test_one_zero_task_vector_among_others_is_not_an_error():
    tau = random_task_vectors(12, 4, 6, 10)
    tau[1] = 0.0
    with jax.enable_x64(True):
        t64 = tau.astype(np.float64)
        assert rel_err(sj.swudi(t64), ref.swudi(t64)) <= 1e-11  # t = 1300 scales rounding, as above
    assert np.all(np.isfinite(sj.swudi_a(tau)))


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_output_dtype_is_the_input_dtype(dtype):
    with jax.enable_x64(dtype == "float64"):
        tau = jnp.asarray(random_task_vectors(13, 4, 6, 10), jnp.dtype(dtype))
        outs = [sj.swudi(tau), sj.swudi_a(tau), sj.pinv_merge(tau), *sj.wudi_gd(tau, steps=3, trajectory_every=1)]
        for out in outs:
            assert out.dtype == jnp.dtype(dtype)
            assert np.all(np.isfinite(np.asarray(out, np.float32)))
        # the low-precision input is computed in float32 and rounded once at the end
        if dtype == "bfloat16":
            want = sj.swudi(np.asarray(tau, np.float32)).astype(jnp.bfloat16)
            np.testing.assert_array_equal(np.asarray(outs[0], np.float32), np.asarray(want, np.float32))


def test_inputs_are_not_modified():
    tau_np = random_task_vectors(14, 4, 6, 10)
    keep = tau_np.copy()
    tau_jax = jnp.asarray(keep)
    for tau in (tau_np, tau_jax):
        sj.swudi(tau)
        sj.swudi_a(tau)
        sj.pinv_merge(tau)
        sj.wudi_gd(tau, steps=3, trajectory_every=1)
        sj.wudi_gd(tau, steps=3, gradient="gram")
    np.testing.assert_array_equal(tau_np, keep)
    assert not tau_jax.is_deleted()
    np.testing.assert_array_equal(np.asarray(tau_jax), keep)


# ------------------------------------------------------------------ the gradient-flow study


def test_gradient_flow_study_finds_sgd_on_the_landweber_filter_and_adam_off_it(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "gradient_flow_study.py"
    spec = importlib.util.spec_from_file_location("gradient_flow_study", script)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    try:
        import matplotlib  # noqa: F401
        plot = []
    except ImportError:
        plot = ["--no-plot"]
    rows = study.main(["--out", str(tmp_path), "--steps", "8", "--eta", "0.1", "--shapes", "3x2x8", *plot])
    (row,) = rows
    assert (row["N"], row["m"], row["n"], row["rank_C"]) == (3, 2, 8, 6)
    assert row["sgd_vs_landweber_rel_err"] < 1e-12
    assert row["sgd_filter_vs_landweber_max_abs"] < 1e-12
    assert row["sgd_non_filter_fraction"] < 1e-20   # SGD's iterates are filtered estimators
    assert row["adam_non_filter_fraction"] > 1e-4   # Adam's are not
    assert 0 < row["sgd_vs_exponential_rel_err"] < 0.1
    assert 1.8 < row["sgd_vs_exponential_rel_err"] / row["sgd_half_eta_vs_exponential_rel_err"] < 2.2
    assert row["t=2*eta*k"] == pytest.approx(1.6)
    import json
    assert json.loads((tmp_path / "gradient_flow_study.json").read_text()) == rows
    assert (tmp_path / "gradient_flow_study.csv").read_text().splitlines()[0].startswith("layer,N,m,n,rank_C")
    assert (tmp_path / "gradient_flow_study.png").exists() == (not plot)
