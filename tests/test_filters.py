"""The per-direction filters h(λ) and SWUDI-A's rank rules, checked against their formulas
(MATH.md §3–4) and the NumPy float64 transcription in ``numpy_reference``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_reference as ref
from swudi_jax.maths import filters

RULES = ["participation_sqrt", "entropy", "participation", "stable_rank", "gavish_donoho",
         "cumulative_variance"]


def spectrum_of(seed: int, n: int, n_floor: int = 0) -> np.ndarray:
    """An ascending, positive spectrum summing to ~N=4 with ``n_floor`` entries at the clamp."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.7, size=n - n_floor)
    lam = 4.0 * lam / lam.sum()
    return np.sort(np.concatenate([np.full(n_floor, filters.EIG_FLOOR), lam]))


LAM = spectrum_of(0, 12).astype(np.float32)


# ----------------------------------------------------------------------------- filters


def test_exponential_filter_is_one_minus_exp_of_minus_lambda_t():
    np.testing.assert_allclose(filters.exponential(3.0)(LAM), 1.0 - np.exp(-3.0 * LAM), rtol=1e-6)


def test_exponential_filter_at_time_zero_keeps_nothing():
    np.testing.assert_array_equal(filters.exponential(0.0)(LAM), np.zeros_like(LAM))


def test_exponential_filter_is_monotone_and_in_unit_interval():
    h = np.asarray(filters.exponential(50.0)(LAM))
    assert np.all(np.diff(h) >= 0) and h.min() >= 0 and h.max() <= 1


def test_landweber_filter_is_one_minus_one_minus_two_eta_lambda_to_the_k():
    eta, k = 0.1, 7
    np.testing.assert_allclose(filters.landweber(eta, k)(LAM), 1 - (1 - 2 * eta * LAM) ** k, rtol=1e-5)
    np.testing.assert_allclose(filters.landweber(eta, k, halved=True)(LAM), 1 - (1 - eta * LAM) ** k,
                               rtol=1e-5)


def test_landweber_filter_after_zero_and_one_step():
    np.testing.assert_array_equal(filters.landweber(0.1, 0)(LAM), np.zeros_like(LAM))
    np.testing.assert_allclose(filters.landweber(0.1, 1)(LAM), 0.2 * LAM, rtol=1e-5, atol=1e-7)


def test_tikhonov_filter_is_lambda_over_lambda_plus_alpha():
    np.testing.assert_allclose(filters.tikhonov(0.3)(LAM), LAM / (LAM + 0.3), rtol=1e-6)
    np.testing.assert_allclose(filters.tikhonov(0.0)(LAM), np.ones_like(LAM), rtol=1e-6)


def test_power_filter_raises_the_normalised_spectrum_or_a_base_filter_to_gamma():
    np.testing.assert_allclose(filters.power(2.0)(LAM), (LAM / LAM.max()) ** 2, rtol=1e-5)
    base = filters.tikhonov(0.5)
    np.testing.assert_allclose(filters.power(0.5, base)(LAM), np.sqrt(LAM / (LAM + 0.5)), rtol=1e-5)
    np.testing.assert_allclose(filters.power(1.0, base)(LAM), base(LAM), rtol=1e-6)
    np.testing.assert_array_equal(filters.power(0.0)(LAM), np.ones_like(LAM))


@pytest.mark.parametrize("k", [0, 1, 5, 12, 20])
def test_top_k_keeps_exactly_the_k_largest_eigenvalues(k):
    h = np.asarray(filters.top_k(k)(LAM))
    assert set(np.unique(h)) <= {0.0, 1.0}
    assert h.sum() == min(k, LAM.size)
    if k > 0:
        assert LAM[h == 1].min() >= LAM[h == 0].max(initial=0.0)
    np.testing.assert_array_equal(h, ref.top_k(LAM, k))


@pytest.mark.parametrize("ratio,n", [(0.65, 10), (0.85, 20), (1.0, 7), (0.01, 50), (0.07, 100), (0.3, 10)])
def test_top_ratio_keeps_ceil_of_ratio_times_n(ratio, n):
    lam = spectrum_of(1, n).astype(np.float32)
    kept = int(np.asarray(filters.top_ratio(ratio)(lam)).sum())
    # the product in floating point, then ceil (0.07·100 = 7.000000000000001 keeps 8),
    # never fewer than one direction
    assert kept == max(1, math.ceil(ratio * n)) == filters.rank_from_ratio(ratio, n)


def test_product_of_filters_multiplies_them_pointwise():
    exp, cut = filters.exponential(2.0), filters.top_k(4)
    swudi_h = filters.product(exp, cut)
    np.testing.assert_allclose(swudi_h(LAM), np.asarray(exp(LAM)) * np.asarray(cut(LAM)), rtol=1e-7)
    np.testing.assert_allclose(swudi_h(LAM), ref.exponential(LAM, 2.0) * ref.top_k(LAM, 4), rtol=1e-6)
    np.testing.assert_allclose(filters.product(exp)(LAM), exp(LAM))
    three = filters.product(exp, cut, filters.tikhonov(1.0))
    np.testing.assert_allclose(three(LAM), ref.exponential(LAM, 2.0) * ref.top_k(LAM, 4) * LAM / (LAM + 1),
                               rtol=1e-6)


def test_identity_filter_keeps_every_direction():
    np.testing.assert_array_equal(filters.identity()(LAM), np.ones_like(LAM))


def test_hard_rank_accepts_a_traced_rank_under_jit_and_vmap():
    lam = jnp.asarray(LAM)
    masks = jax.jit(jax.vmap(lambda k: filters.hard_rank(k)(lam)))(jnp.arange(4))
    for k in range(4):
        np.testing.assert_array_equal(masks[k], ref.top_k(LAM, k))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 30), t=st.floats(0.0, 500.0),
       eta=st.floats(1e-4, 0.2), k=st.integers(0, 40))
def test_filters_match_the_numpy_transcription(seed, n, t, eta, k):
    lam = spectrum_of(seed, n)
    with jax.enable_x64(True):
        lam64 = jnp.asarray(lam, jnp.float64)
        np.testing.assert_allclose(filters.exponential(t)(lam64), ref.exponential(lam, t), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(filters.landweber(eta, k)(lam64), ref.landweber(lam, eta, k),
                                   rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(filters.tikhonov(eta)(lam64), ref.tikhonov(lam, eta), rtol=1e-12)


# -------------------------------------------------------------------------- rank rules


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), n_floor=st.integers(0, 10),
       m=st.integers(1, 50), rule=st.sampled_from(RULES))
def test_rank_rules_match_the_numpy_transcription(seed, n, n_floor, m, rule):
    lam = spectrum_of(seed, n, min(n_floor, n - 1))
    with jax.enable_x64(True):
        got = int(filters.get_rank_rule(rule)(jnp.asarray(lam, jnp.float64), (m, n)))
    assert got == ref.RANK_RULES[rule](lam, (m, n))


def test_effective_rank_rules_count_a_flat_spectrum_as_full_rank():
    lam = jnp.full(8, 4.0)  # √λ = 2 exactly, so every ratio is an exact integer
    for rule in ["participation_sqrt", "entropy", "participation", "stable_rank"]:
        assert int(filters.get_rank_rule(rule)(lam, (8, 8))) == 8, rule
    # nothing stands above the noise threshold ω·median (ω > 1): the floor of one
    assert int(filters.gavish_donoho(lam, (8, 8))) == 1


def test_rank_rule_formulas_on_a_hand_computed_spectrum():
    lam = jnp.asarray([1.0, 1.0, 4.0, 4.0])  # Σλ = 10, Σ√λ = 6, Σλ² = 34, λmax = 4
    assert int(filters.participation_sqrt(lam)) == math.ceil(36 / 10) == 4
    assert int(filters.participation(lam)) == math.ceil(100 / 34) == 3
    assert int(filters.stable_rank(lam)) == math.ceil(34 / 16) == 3
    p = np.array([0.1, 0.1, 0.4, 0.4])
    assert int(filters.entropy(lam)) == math.ceil(math.exp(-np.sum(p * np.log(p)))) == 4
    # top-1 share 0.4, top-2 0.8, top-3 0.9 (reaches 0.9 exactly at K = 3)
    assert int(filters.cumulative_variance(0.8)(lam)) == 2
    assert int(filters.cumulative_variance(0.5)(lam)) == 2
    assert int(filters.cumulative_variance(0.4)(lam)) == 1


def test_gavish_donoho_thresholds_at_the_lower_median_for_an_even_count():
    # square layer: β = 1, μ = √(2+√3), ω = √(4 + 8/6)/μ ≈ 1.1954
    y = np.array([1.0, 2.0, 2.5, 3.0])
    lam = jnp.asarray(y**2)
    omega = math.sqrt(4 + 8 / 6) / math.sqrt(2 + math.sqrt(3))
    lower = int(np.sum(y > omega * 2.0))      # lower median 2   -> threshold 2.39 -> 2 kept
    averaged = int(np.sum(y > omega * 2.25))  # averaged median  -> threshold 2.69 -> 1 kept
    assert (lower, averaged) == (2, 1)
    assert int(filters.gavish_donoho(lam, (4, 4))) == lower


def test_gavish_donoho_keeps_at_least_one_direction():
    assert int(filters.gavish_donoho(jnp.full(6, 2.0), (6, 3))) == 1


@pytest.mark.parametrize("min_rank,max_rank_ratio,want", [
    (1, 1.0, 9),    # the rule's own K
    (1, 0.5, 5),    # capped at round(0.5·10) = 5
    (10, 1.0, 10),  # raised to min_rank
    (3, 0.1, 3),    # round(0.1·10) = 1 < min_rank: the cap becomes min_rank
    (1, 0.25, 2),   # round(2.5) = 2 (round half to even, as Python's round)
])
def test_adaptive_rank_clamps_to_min_rank_and_max_rank_ratio(min_rank, max_rank_ratio, want):
    rule_says_nine = lambda lam, shape: jnp.int32(9)  # noqa: E731
    k = filters.adaptive_rank(jnp.asarray(LAM[:10]), rule_says_nine, (5, 10), min_rank=min_rank,
                              max_rank_ratio=max_rank_ratio)
    assert int(k) == want == ref.clamp_rank(9, 10, min_rank, max_rank_ratio)


def test_adaptive_rank_never_exceeds_the_number_of_directions():
    lam = jnp.full(6, 1.0)
    assert int(filters.adaptive_rank(lam, filters.participation_sqrt, (6, 6), min_rank=9)) == 6


def test_rank_rules_stay_finite_on_a_spectrum_clamped_at_the_floor():
    lam = jnp.asarray(spectrum_of(3, 16, n_floor=12), jnp.float32)
    for rule in RULES:
        k = int(filters.get_rank_rule(rule)(lam, (8, 16)))
        assert 1 <= k <= 16, rule


def test_unknown_rank_rule_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown rank_rule 'bogus'.*participation_sqrt"):
        filters.get_rank_rule("bogus")
