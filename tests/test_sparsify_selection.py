"""The sort-free magnitude selection equals the stable sort it replaces, ties at the cut included."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from swudi_jax.methods import sparsify as sp


def sorted_window(mag, lo, hi, descending):
    """NumPy reference: positions in the stable sort (NaN last), kept iff lo <= position < hi."""
    order = np.argsort(-mag if descending else mag, kind="stable")
    position = np.empty(mag.size, np.int64)
    position[order] = np.arange(mag.size)
    return (position >= lo) & (position < hi)


def tied_magnitudes(rng, n):
    """Few distinct magnitudes (many exact ties at any cut), sometimes a NaN, an inf or subnormals."""
    mag = np.abs(rng.integers(-4, 5, n)).astype(np.float32) * rng.choice([1.0, 0.5, 1e-40])
    if rng.random() < 0.2:
        mag[rng.integers(0, n)] = np.nan
    if rng.random() < 0.2:
        mag[rng.integers(0, n)] = np.inf
    return mag


@pytest.mark.parametrize("descending", [True, False])
def test_window_mask_equals_the_stable_sort_with_ties_at_the_cut(descending):
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 50))
        mag = tied_magnitudes(rng, n) if rng.random() < 0.7 else np.abs(rng.standard_normal(n)).astype(np.float32)
        lo = int(rng.integers(0, n + 1))
        hi = int(rng.integers(lo, n + 1))
        got = sp.window_mask(jnp.asarray(mag), jnp.array([lo, hi]), descending)
        np.testing.assert_array_equal(np.asarray(got), sorted_window(mag, lo, hi, descending))


def test_ranks_equal_the_stable_sort_positions():
    mag = np.abs(np.random.default_rng(1).integers(-3, 4, (3, 40))).astype(np.float32)
    for descending in (True, False):
        got = np.asarray(sp.ranks(jnp.asarray(mag), descending))
        for row, r in zip(mag, got):
            order = np.argsort(-row if descending else row, kind="stable")
            np.testing.assert_array_equal(r[order], np.arange(row.size))


@pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_sparsify_keeps_the_sorted_window_per_model_density(method, dtype):
    rng = np.random.default_rng(2)
    tau = (rng.integers(-6, 7, (4, 9, 13)) / 8).astype(dtype)  # exact in bf16, many equal |τ|
    density, gamma = [0.0, 0.37, 0.5, 1.0], [0.1, 0.05, 0.2, 0.0]
    windows = sp.rank_windows(method, density, 9 * 13, gamma)
    got = np.asarray(sp.sparsify(jnp.asarray(tau), method, density, gamma=gamma), np.float32)
    for i in range(4):
        mag = np.abs(tau[i].astype(np.float32)).ravel()
        keep = sorted_window(mag, *windows[i], method == "magnitude").reshape(tau[i].shape)
        np.testing.assert_array_equal(got[i], np.where(keep, tau[i].astype(np.float32), 0))


def test_selection_is_jit_and_vmap_able_with_traced_counts():
    rng = np.random.default_rng(3)
    keys = sp.order_keys(jnp.asarray(tied_magnitudes(rng, 30 * 5).reshape(5, 30)), descending=True)
    counts = jnp.array([0, 1, 7, 29, 30])
    got = jax.jit(jax.vmap(sp.first_in_order))(keys, counts)
    for row, k, g in zip(np.asarray(keys), np.asarray(counts), np.asarray(got)):
        np.testing.assert_array_equal(g, sorted_window(row.astype(np.float64), 0, k, False))
