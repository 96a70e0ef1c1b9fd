"""Symmetric products AᵀA at about half the flops of one matmul (a syrk-like Gram).

XLA has no symmetric rank-k update (BLAS ``syrk``), so :func:`symmetric_gram` builds one from
ordinary matmuls: the n columns of A (r × n) are cut into b column blocks, block row i of the
upper triangle is one product A[:, blk_i]ᵀ A[:, start_i:], and the lower triangle is the
mirror of the upper one. Block row i costs 2·r·|blk_i|·(n − start_i) flops, in all
(b + 1)/(2b) of the full 2·r·n² product (b = 8: 56%), with b large products rather than
b(b + 1)/2 small ones. The result is exactly symmetric (each lower entry *is* its upper
mirror), which the eigendecomposition may then read without symmetrising.

:func:`gram_flops` gives the flops of that scheme, used to pick the cheapest association of
the interference operator and the right-hand side (:mod:`swudi_jax.spectral`).
"""

from __future__ import annotations

import jax.numpy as jnp

from swudi_jax.maths.linalg import HIGHEST

MIN_BLOCK = 384
"""Column blocks are at least this wide: narrower products (and their batched, vmapped form)
run well below the matmul rate on CPU, so n < 768 stays one plain product. With jax 0.10.2 on
2 CPU cores, 384 instead of 512 gave bit-identical results and SWUDI 2 % faster on 768-wide
layers (ViT-B's 768² ×4 and 3072×768, 8 experts; ``benchmarks/README.md``, "Layer floor")."""
MAX_BLOCKS = 8
"""At most this many block rows: (b + 1)/(2b) gains little past 8 (56% at 8, 50% at ∞)."""


def gram_blocks(n: int) -> int:
    """How many column blocks :func:`symmetric_gram` cuts n columns into (1: one plain matmul)."""
    return max(1, min(MAX_BLOCKS, n // MIN_BLOCK))


def block_bounds(n: int, blocks: int) -> list[int]:
    """Column block boundaries 0 = s_0 < s_1 < … < s_b = n, as even as integer division allows."""
    return [i * n // blocks for i in range(blocks + 1)]


def gram_flops(rows: int, n: int) -> int:
    """Flops of :func:`symmetric_gram` for A of shape (rows, n): 2·rows·Σᵢ |blk_i|·(n − s_i)."""
    bounds = block_bounds(n, gram_blocks(n))
    return 2 * rows * sum((hi - lo) * (n - lo) for lo, hi in zip(bounds, bounds[1:]))


def symmetric_gram(a: jnp.ndarray) -> jnp.ndarray:
    """G = AᵀA for A of shape (r, n): the upper triangle by block rows, the lower its mirror.

    Args:
      a: (r, n) array (any float dtype; products at ``precision=HIGHEST``).
    Returns:
      The (n, n) Gram matrix, exactly symmetric. Works under ``jax.vmap`` and ``jax.jit``.
    """
    if a.ndim != 2:
        raise ValueError(f"symmetric_gram needs a 2-D array (r, n), got shape {tuple(a.shape)}")
    n = a.shape[1]
    blocks = gram_blocks(n)
    if blocks == 1:
        g = jnp.matmul(a.T, a, precision=HIGHEST)
    else:
        bounds = block_bounds(n, blocks)
        rows = []
        for lo, hi in zip(bounds, bounds[1:]):
            strip = jnp.matmul(a[:, lo:hi].T, a[:, lo:], precision=HIGHEST)  # G[lo:hi, lo:]
            rows.append(jnp.pad(strip, ((0, 0), (lo, 0))))
        g = jnp.concatenate(rows, axis=0)
    # Lower triangle = strict upper one transposed, added to zeros: exactly the mirror. Not
    # ``jnp.where(iota_row <= iota_col, g, g.T)``: on jax/jaxlib 0.10.2 XLA CPU compiles that
    # select-of-a-transpose into a ``copy_select_fusion`` that segfaults (n = 1000, 1024) or
    # hangs (n = 2048) even as the whole jitted program; n ≤ 768 works. triu + transpose is safe.
    return jnp.triu(g) + jnp.triu(g, 1).T


def matmul_flops(m: int, k: int, n: int) -> int:
    """Flops of one (m × k)·(k × n) product: 2·m·k·n."""
    return 2 * m * k * n


def plain_gram_flops(rows: int, n: int) -> int:
    """Flops of AᵀA as one plain matmul, for comparison: 2·rows·n²."""
    return matmul_flops(n, rows, n)


__all__ = [
    "MAX_BLOCKS",
    "MIN_BLOCK",
    "block_bounds",
    "gram_blocks",
    "gram_flops",
    "matmul_flops",
    "plain_gram_flops",
    "symmetric_gram",
]
