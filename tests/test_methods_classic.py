"""Task arithmetic, averaging, TIES and DARE against NumPy transcriptions of their papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swudi_jax as sj
from swudi_jax.methods.dare import dare, drop_and_rescale, leaf_key
from swudi_jax.methods.ties import ties, ties_model_thresholds

N_TASKS = 3


def np_threshold(mags, density):
    """The k-th largest magnitude, k = max(1, floor(density · size))."""
    k = max(1, int(np.floor(density * mags.size)))
    return np.sort(mags.ravel())[::-1][k - 1]


def np_disjoint_merge(trimmed):
    elected = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == elected) & (trimmed != 0)
    return (trimmed * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def np_ties(taus, density, thresholds):
    trimmed = np.where(np.abs(taus) >= thresholds.reshape(-1, *[1] * (taus.ndim - 1)), taus, 0)
    return np_disjoint_merge(trimmed)


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    base = {"a": {"kernel": rng.normal(size=(6, 5)).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)},
            "b": {"kernel": rng.normal(size=(5, 4)).astype(np.float32)}, "count": np.array(7, np.int32)}
    experts = []
    for i in range(N_TASKS):
        scale = [0.01, 0.1, 1.0][i]  # very different task-vector sizes: model and tensor trims differ
        experts.append(jax.tree_util.tree_map(
            lambda x: x + scale * rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else x, base))
    return base, experts


def taus_of(base, experts, *keys):
    def get(tree):
        for k in keys:
            tree = tree[k]
        return np.asarray(tree, np.float32)
    return np.stack([get(e) - get(base) for e in experts])  # float32, as merge computes them


LEAVES = [("a", "kernel"), ("a", "bias"), ("b", "kernel")]


def get(tree, keys):
    for k in keys:
        tree = tree[k]
    return np.asarray(tree)


def test_task_arithmetic_is_base_plus_point_three_times_the_sum(model):
    base, experts = model
    merged = sj.merge(base, experts, method="task_arithmetic_paper")
    merged_half = sj.merge(base, experts, method="task_arithmetic_paper", scale=0.5)
    for keys in LEAVES:
        tau = taus_of(base, experts, *keys)
        np.testing.assert_allclose(get(merged, keys), get(base, keys) + 0.3 * tau.sum(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(get(merged_half, keys), get(base, keys) + 0.5 * tau.sum(0), rtol=1e-5, atol=1e-6)
    assert int(merged["count"]) == 7 and merged["count"].dtype == np.int32


def test_average_is_the_mean_of_the_experts(model):
    base, experts = model
    merged = sj.merge(base, experts, method="average")
    for keys in LEAVES:
        want = np.mean([get(e, keys) for e in experts], axis=0)
        np.testing.assert_allclose(get(merged, keys), want, rtol=1e-5, atol=1e-6)


def test_ties_tensor_trim_matches_numpy(model):
    base, experts = model
    merged = sj.merge(base, experts, method="ties_paper", trim="tensor", density=0.3)
    for keys in LEAVES:
        tau = taus_of(base, experts, *keys)
        thresholds = np.array([np_threshold(np.abs(t).astype(np.float32), 0.3) for t in tau])
        want = get(base, keys) + np_ties(tau, 0.3, thresholds)
        np.testing.assert_allclose(get(merged, keys), want, rtol=1e-5, atol=1e-6)


def test_ties_model_trim_matches_numpy_and_differs_from_tensor_trim(model):
    base, experts = model
    merged = sj.merge(base, experts, method="ties_paper")  # trim="model", density 0.2: the paper
    tensor = sj.merge(base, experts, method="ties_paper", trim="tensor")
    flat = np.concatenate([taus_of(base, experts, *k).reshape(N_TASKS, -1) for k in LEAVES], axis=1)
    thresholds = np.array([np_threshold(np.abs(t).astype(np.float32), 0.2) for t in flat])
    differs = False
    for keys in LEAVES:
        want = get(base, keys) + np_ties(taus_of(base, experts, *keys), 0.2, thresholds)
        np.testing.assert_allclose(get(merged, keys), want, rtol=1e-5, atol=1e-6)
        differs |= not np.allclose(get(merged, keys), get(tensor, keys))
    assert differs


def test_ties_keeps_density_of_each_task_and_elects_sign_by_mass():
    tau = jnp.array([[3.0, -1.0, 0.5, 0.2, 0.1], [-1.0, -1.5, 0.4, 0.3, 2.0]])
    # density 0.4 keeps 2 entries per task: {3, -1} and {-1.5, 2}; entry 0: 3 - 1 > 0 → +, only 3 agrees
    np.testing.assert_allclose(ties(tau, density=0.4), [3.0, -1.25, 0.0, 0.0, 2.0])


def test_streamed_model_thresholds_are_the_exact_kth_largest_magnitudes():
    rng = np.random.default_rng(3)
    chunks = [rng.normal(size=(4, 7, 3)).astype(np.float32), np.round(rng.normal(size=(4, 50)), 1).astype(np.float32),
              rng.normal(size=(4, 1)).astype(np.float32) * 1e-30]
    flat = np.concatenate([c.reshape(4, -1) for c in chunks], axis=1)
    for density in (0.01, 0.2, 0.5, 1.0):
        want = np.array([np_threshold(np.abs(row), density) for row in flat])
        np.testing.assert_array_equal(ties_model_thresholds(chunks, density), want)
        np.testing.assert_array_equal(ties_model_thresholds(lambda: iter(chunks), density), want)
    with pytest.raises(ValueError, match="one-shot iterator"):
        ties_model_thresholds(iter(chunks), 0.2)
    with pytest.raises(ValueError, match="same number of tasks"):
        ties_model_thresholds([chunks[0], chunks[1][:2]], 0.2)


def test_dare_is_deterministic_given_the_seed_and_changes_with_it(model):
    base, experts = model
    first = sj.merge(base, experts, method="dare", seed=1)
    again = sj.merge(base, experts, method="dare", seed=1)
    other = sj.merge(base, experts, method="dare", seed=2)
    for keys in LEAVES:
        np.testing.assert_array_equal(get(first, keys), get(again, keys))
    assert not np.allclose(get(first, ("a", "kernel")), get(other, ("a", "kernel")))


def test_dare_in_merge_uses_the_per_leaf_key_and_task_arithmetic_scale(model):
    base, experts = model
    merged = sj.merge(base, experts, method="dare", seed=4, drop=0.5)
    tau = jnp.asarray(taus_of(base, experts, "a", "kernel"), jnp.float32)
    # a linear weight's mask is drawn in maths layout (outputs, inputs): the kernel transposed
    mask = np.asarray(jax.random.bernoulli(leaf_key(4, "a/kernel"), 0.5, (N_TASKS, 5, 6))).transpose(0, 2, 1)
    want = get(base, ("a", "kernel")) + 0.3 * (np.asarray(tau) * mask / 0.5).sum(0)
    np.testing.assert_allclose(get(merged, ("a", "kernel")), want, rtol=1e-5, atol=1e-6)


def test_dare_then_ties_is_the_disjoint_merge_of_the_dropped_vectors():
    tau = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4, 6)), jnp.float32)
    key = jax.random.PRNGKey(9)
    dropped = np.asarray(drop_and_rescale(tau, key, 0.6))
    np.testing.assert_allclose(dare(tau, drop=0.6, then="ties", key=key), np_disjoint_merge(dropped), rtol=1e-6)


def test_dare_drops_a_fraction_p_and_preserves_the_expected_task_vector():
    tau = jnp.asarray(np.random.default_rng(6).normal(size=(2, 200)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    dropped = jax.vmap(lambda k: drop_and_rescale(tau, k, 0.9))(keys)
    assert abs(float(jnp.mean(dropped == 0)) - 0.9) < 0.005
    # the mean over draws ≈ τ: each entry's standard error is |τ|·sqrt(p/(1−p)/draws) = |τ|·0.047
    merged = jax.vmap(lambda k: dare(tau, drop=0.9, key=k))(keys)
    err = np.asarray(jnp.mean(merged, axis=0) - tau.sum(0))
    assert np.sqrt(np.mean(err**2)) < 0.1 * np.sqrt(np.mean(np.asarray(tau.sum(0)) ** 2))
