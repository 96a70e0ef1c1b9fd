"""The syrk-like symmetric Gram and the flop counts that pick C's and D's association."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from swudi_jax.maths.gram import block_bounds, gram_blocks, gram_flops, plain_gram_flops, symmetric_gram
from swudi_jax.maths.spectral import cd_flops, shares_gram


@pytest.mark.parametrize("shape", [(7, 5), (40, 1100), (3, 1030)])
def test_symmetric_gram_is_the_exactly_symmetric_product_a_transpose_a(shape):
    a = np.random.default_rng(0).standard_normal(shape)
    with jax.enable_x64(True):
        g = np.asarray(symmetric_gram(a))
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_allclose(g, a.T @ a, rtol=1e-12, atol=1e-12 * np.abs(a.T @ a).max())


def test_symmetric_gram_works_under_vmap_in_float32():
    a = np.random.default_rng(1).standard_normal((3, 16, 1024)).astype(np.float32)
    g = np.asarray(jax.vmap(symmetric_gram)(a))
    assert g.dtype == np.float32 and g.shape == (3, 1024, 1024)
    np.testing.assert_array_equal(g, np.swapaxes(g, 1, 2))
    want = np.einsum("brn,brp->bnp", a.astype(np.float64), a.astype(np.float64))
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_symmetric_gram_refuses_a_non_matrix():
    with pytest.raises(ValueError, match="2-D array"):
        symmetric_gram(np.ones((2, 3, 4), np.float32))


def test_block_scheme_counts_about_half_the_flops_of_a_plain_product_for_wide_matrices():
    assert gram_blocks(767) == 1 and gram_flops(10, 767) == plain_gram_flops(10, 767)
    assert gram_blocks(768) == 2 and gram_flops(10, 768) == plain_gram_flops(10, 768) * 3 // 4
    bounds = block_bounds(3072, gram_blocks(3072))
    assert bounds[0] == 0 and bounds[-1] == 3072 and len(bounds) == gram_blocks(3072) + 1
    b = gram_blocks(3072)
    assert gram_flops(6144, 3072) == pytest.approx(plain_gram_flops(6144, 3072) * (b + 1) / (2 * b))


def test_square_and_tall_layers_share_the_grams_and_wide_layers_do_not():
    assert shares_gram((8, 768, 768)) and shares_gram((8, 3072, 768))
    assert not shares_gram((8, 768, 3072))
    assert cd_flops((8, 768, 3072), False) < cd_flops((8, 768, 3072), True)
