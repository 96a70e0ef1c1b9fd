"""mergekit's cuts by sorting keep the entries PyTorch's CPU sort and top-k keep, ties at the cut
included: ``swudi_jax.methods.sort_order`` against the element-by-element transcription of
the standard library's algorithms in ``torch_sort_reference``."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch_sort_reference as tsr

from swudi_jax.methods import sort_order as so
from swudi_jax.methods import sparsify as sp


def tied(rng, n):
    """Few distinct values: many exact ties at any cut."""
    return (rng.integers(0, int(rng.integers(1, 12)), n) / 4).astype(np.float64)


def test_sort_cuts_equal_the_standard_library_sort_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(80):
        n = int(rng.integers(1, 400))
        keys = tied(rng, n)
        want = tsr.std_sort(keys.tolist())
        cuts = sorted(rng.integers(0, n + 1, 2).tolist())
        got = so.sorted_order(keys, cuts)
        for c in cuts:
            assert set(got[:c].tolist()) == set(want[:c])


def test_blocked_scan_counts_and_half_precision_keys_give_the_same_cuts(monkeypatch):
    """The partition counts scan stops per block of positions (sort_order.BLOCK, 65536 entries)
    and ranks non-negative bf16/f16 by their bit patterns: with blocks of 7 entries, and with the
    values as float64 keys, the kept sets are the same as with one block."""
    rng = np.random.default_rng(7)
    for dtype in (ml_dtypes.bfloat16, np.float16):
        for _ in range(6):
            n = int(rng.integers(300, 3000))
            values = np.abs(tied(rng, n) - 1.0).astype(dtype)
            lo, hi = sorted(rng.integers(0, n + 1, 2).tolist())
            k = int(rng.integers(1, n + 1))
            want = [so.window_of_sort(values.astype(np.float64), lo, hi, d) for d in (True, False)]
            want_top = so.topk_mask(values.astype(np.float64), k)
            monkeypatch.setattr(so, "BLOCK", 7)
            for d, w in zip((True, False), want):
                np.testing.assert_array_equal(so.window_of_sort(values, lo, hi, d), w)
            np.testing.assert_array_equal(so.topk_mask(values, k), want_top)
            monkeypatch.undo()


def test_heap_fallbacks_below_the_depth_limit_equal_the_standard_library():
    """A small level budget forces the heap sort of introsort and the heap selection of
    introselect (rare with median-of-three pivots on real data, so they are forced here)."""
    rng = np.random.default_rng(1)
    for depth in (0, 1, 2):
        for _ in range(15):
            n = int(rng.integers(17, 300))
            keys = tied(rng, n)
            cut = int(rng.integers(0, n + 1))
            want = tsr.std_sort(keys.tolist(), depth=depth)
            assert set(so.sorted_order(keys, [cut], depth=depth)[:cut].tolist()) == set(want[:cut])
            k = int(rng.integers(n // 64 + 1, n + 1))
            got = np.flatnonzero(so.selected_smallest(keys, k, depth=depth))
            assert set(got.tolist()) == tsr.std_select(keys.tolist(), k, depth=depth)


def test_topk_equals_nth_element_and_partial_sort_with_ties():
    rng = np.random.default_rng(2)
    for i in range(60):
        n = int(rng.integers(1, 2000))
        values = tied(rng, n)
        k = int(rng.integers(0, max(1, n // 64) + 1)) if i % 2 else int(rng.integers(0, n + 1))  # both paths
        assert set(np.flatnonzero(so.topk_mask(values, k)).tolist()) == tsr.topk(values.tolist(), k)


def test_nan_sorts_above_every_number_as_in_pytorch():
    values = np.array([1.0, np.nan, 3.0, np.inf, 3.0, np.nan, 0.0])
    assert set(np.flatnonzero(so.window_of_sort(values, 0, 2, descending=True))) == {1, 5}
    assert set(np.flatnonzero(so.window_of_sort(values, 5, 7, descending=False))) == {1, 5}
    assert set(np.flatnonzero(so.topk_mask(values, 3))) == {1, 5, 3}


@pytest.mark.parametrize("descending", [True, False])
def test_window_mask_is_jit_and_vmap_able(descending):
    rng = np.random.default_rng(3)
    mag = np.abs(tied(rng, 5 * 40)).reshape(5, 40).astype(np.float32)
    windows = np.array([[0, 0], [0, 7], [3, 29], [10, 40], [0, 40]], np.int32)
    got = np.asarray(jax.jit(jax.vmap(lambda m, w: sp.window_mask(m, w, descending)))(mag, windows))
    for row, (lo, hi), g in zip(mag, windows, got):
        order = tsr.argsort(row.tolist(), descending=descending)
        assert set(np.flatnonzero(g).tolist()) == set(order[lo:hi])


@pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_sparsify_keeps_pytorchs_window_per_model_density(method, dtype):
    rng = np.random.default_rng(4)
    tau = (rng.integers(-6, 7, (4, 9, 13)) / 8).astype(dtype)  # exact in bf16, many equal |τ|
    density, gamma = [0.0, 0.37, 0.5, 1.0], [0.1, 0.05, 0.2, 0.0]
    windows = sp.rank_windows(method, density, 9 * 13, gamma)
    got = np.asarray(sp.sparsify(jnp.asarray(tau), method, density, gamma=gamma), np.float32)
    for i in range(4):
        mag = np.abs(tau[i].astype(np.float32)).ravel().tolist()
        lo, hi = windows[i]
        kept = set(tsr.argsort(mag, descending=method == "magnitude")[lo:hi])
        keep = np.isin(np.arange(len(mag)), list(kept)).reshape(tau[i].shape)
        np.testing.assert_array_equal(got[i], np.where(keep, tau[i].astype(np.float32), 0))


def test_variance_selection_keeps_pytorchs_topk():
    rng = np.random.default_rng(5)
    tau = jnp.asarray((rng.integers(-3, 4, (4, 12, 10)) / 4).astype(np.float32))  # exact means
    var = np.var(np.asarray(tau, np.float64), axis=0).ravel()
    for density in (0.01, 0.3, 0.77):
        k = int(np.float32(np.count_nonzero(var)) * np.float32(density))
        got = np.flatnonzero(np.asarray(sp.variance_topk_mask(tau, density)).ravel())
        assert set(got.tolist()) == tsr.topk(var.tolist(), k)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_ranks_equal_the_stable_sort_positions(dtype, monkeypatch):
    monkeypatch.setattr(sp, "RANK_BLOCK", 64)  # several blocks of rows
    mag = np.abs(np.random.default_rng(6).integers(-3, 4, (3, 25, 40))).astype(dtype)
    for descending in (True, False):
        got = np.asarray(jax.vmap(lambda m: sp.ranks(m, descending))(jnp.asarray(mag)))
        for row, r in zip(mag.reshape(-1, 40).astype(np.float32), got.reshape(-1, 40)):
            order = np.argsort(-row if descending else row, kind="stable")
            np.testing.assert_array_equal(r[order], np.arange(row.size))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
def test_host_callback_operands_cross_as_bytes_in_every_dtype(dtype):
    """A callback's operands are converted in the thread that runs it: a pool thread under the
    thread-local ``jax.enable_x64`` narrowed a float64 stack's bits to uint32 (the TIES report
    failed); bytes cross unchanged, batch axes included (vmap's ``expand_dims``)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 5)).astype(dtype)
    with jax.enable_x64(True):
        data = np.asarray(jax.jit(sp.to_host)(jnp.asarray(x)))
        back = sp.from_host(data, dtype)
        assert back.dtype == np.dtype(dtype) and back.shape == x.shape
        assert back.tobytes() == x.tobytes()
        device = jax.lax.bitcast_convert_type(jnp.asarray(sp.host_bytes(back)), x.dtype)
        assert np.asarray(device).tobytes() == x.tobytes()
