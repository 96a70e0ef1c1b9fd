"""Sparsifiers of a task-vector stack, one model at a time, as mergekit defines them.

Each sparsifier keeps a subset of one task vector τi's entries (per tensor, never over the
whole model) and optionally rescales the survivors. With per-model parameters d (density),
γ (gamma) and ε (epsilon), D entries per tensor, magnitudes |τi| ranked in float32:

- ``magnitude`` (TIES trim, Yadav et al. 2023): keep the k = max(1, ⌊d·D⌋) largest |τi|.
- ``magnitude_outliers`` (Model Breadcrumbs, Davari & Belilovsky 2023, arXiv 2312.06795):
  sort |τi| ascending, drop the n_top = ⌊γ·D⌋ largest and the smallest, keep the
  ⌊d·D⌋ entries at ascending positions [n_bot, n_bot + ⌊d·D⌋), n_bot = max(0, D − ⌊d·D⌋ − n_top)
  (fewer outliers are dropped when d + γ > 1; d < 1/D keeps nothing).
- ``random`` (DARE, Yu et al. 2024, arXiv 2311.03099): keep each entry with probability d.
- ``della_magprune`` (DELLA, Deep et al. 2024, arXiv 2406.11617): keep each entry with
  probability p = (d − ε) + 2ε·(r − 1)/(n − 1), r ∈ 1..n its ascending-magnitude rank
  along axis 1 (a 1-D tensor is one row of n; n = 1 gives p = d − ε); needs 0 < d ± ε < 1.
- ``variance_topk_mask`` (SCE's "select", Wan et al. 2024, arXiv 2408.07990): one mask for
  all models, the k = ⌊d·#{var ≠ 0}⌋ entries of largest variance across models.

d ≥ 1 returns τi unchanged; d ≤ 0 returns zeros. Equal magnitudes at a cut are kept as
mergekit's PyTorch CPU sort and top-k leave them (:mod:`swudi_jax.methods.sort_order`: the
standard library's introsort and introselect, computed on the host through
``jax.pure_callback``), so the kept sets are mergekit's in every dtype, bf16 included.

Rescaling of the survivors m ⊙ τi (mergekit 0.1.5 ``rescale: true`` means "l1"):
``"l1"``/``"l2"``/``"linf"`` multiply by ‖τi‖/‖m ⊙ τi‖ in that norm unless either norm is
< 1e-7; ``"keep_prob"`` divides each survivor by its keep probability (the DARE and DELLA
papers' 1/(1 − p_drop), and older mergekit's DARE rescale; random sparsifiers only).

Random masks are ``u < p`` with u uniform in [0, 1) of the stack's shape: drawn from
``key`` block by block (:func:`draw_uniforms`, deterministic given the key) or passed as
``uniforms`` (tests feed one source to two implementations).

Counts such as ⌊d·D⌋ follow mergekit's float64 arithmetic exactly when ``density`` and
``gamma`` are concrete (host) arrays: :func:`rank_windows` computes them on the host (a float32 parameter is read as its shortest
decimal form, 0.7f → 0.7, the value the user wrote). Under
an outer ``jit``/``vmap`` they are computed in float32, which differs only where d·D lies
within float32 rounding of an integer (e.g. 0.29·100); pass ``windows`` from
:func:`rank_windows` to keep them exact there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import compute_dtype, round_to, sum_leading
from swudi_jax.maths.validation import is_concrete
from swudi_jax.methods import sort_order

SPARSIFIERS = ("magnitude", "magnitude_outliers", "random", "della_magprune")
RESCALES = ("l1", "l2", "linf", "keep_prob")
RESCALE_EPS = 1e-7
_RANKED = ("magnitude", "magnitude_outliers")


def per_model(value: Any, n: int, name: str) -> jax.Array | np.ndarray:
    """A scalar or (n,) per-model parameter as an (n,) array (host values stay NumPy float64)."""
    if is_concrete(value):
        arr = np.asarray(value)
        if arr.dtype != np.float64 and jnp.issubdtype(arr.dtype, jnp.floating):
            # A float32 0.7 stands for the decimal 0.7: read each value by its shortest
            # decimal form, so that counts like int(0.7 · 40) = 28 match mergekit's floats.
            arr = np.array([float(np.format_float_positional(np.float32(v), unique=True)) for v in arr.ravel()],
                           np.float64).reshape(arr.shape)
        arr = arr.astype(np.float64)
    else:
        arr = jnp.asarray(value, jnp.float32)
    if arr.ndim == 0:
        return (np.full if isinstance(arr, np.ndarray) else jnp.full)((n,), arr)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or one value per model, shape ({n},); got shape {arr.shape}")
    return arr


def _host(x: Any) -> np.ndarray | None:
    """x as a NumPy float64 array when it is concrete, else None."""
    if not is_concrete(x):
        return None
    return np.asarray(x, np.float64)


def rank_windows(method: str, density: Any, size: int, gamma: Any = 0.0) -> np.ndarray:
    """Per model, the kept window [lo, hi) of magnitude ranks, with mergekit's float64 counts.

    ``magnitude`` ranks descending (window [0, max(1, ⌊d·D⌋))); ``magnitude_outliers`` ranks
    ascending (window [n_bot, n_bot + ⌊d·D⌋)). d ≥ 1 keeps [0, D); d ≤ 0 keeps nothing.

    Args:
      method: "magnitude" or "magnitude_outliers".
      density: (N,) or scalar, on the host. gamma: the same, for "magnitude_outliers".
      size: D, the entries per model in the tensor.
    Returns:
      int32 (N, 2).
    """
    if method not in _RANKED:
        raise ValueError(f"method must be one of {_RANKED} for rank windows, got {method!r}")
    d = np.atleast_1d(np.asarray(density, np.float64))
    g = np.broadcast_to(np.asarray(gamma, np.float64), d.shape)
    out = np.zeros((d.size, 2), np.int64)
    for i, (di, gi) in enumerate(zip(d, g)):
        if di >= 1:
            out[i] = (0, size)
        elif di <= 0:
            out[i] = (0, 0)
        elif method == "magnitude":
            out[i] = (0, max(1, int(di * size)))
        else:
            target, n_top = int(di * size), int(gi * size)
            n_bot = max(0, size - target - n_top)
            out[i] = (n_bot, n_bot + target)
    return out.astype(np.int32)


def _traced_windows(method: str, density: jax.Array, size: int, gamma: jax.Array) -> jax.Array:
    """:func:`rank_windows` in float32 inside a trace."""
    d = density.astype(jnp.float32)
    target = jnp.floor(d * size).astype(jnp.int32)
    if method == "magnitude":
        lo, hi = jnp.zeros_like(target), jnp.maximum(1, target)
    else:
        n_top = jnp.floor(gamma.astype(jnp.float32) * size).astype(jnp.int32)
        lo = jnp.maximum(0, size - target - n_top)
        hi = lo + target
    lo = jnp.where(d >= 1, 0, jnp.where(d <= 0, 0, lo))
    hi = jnp.where(d >= 1, size, jnp.where(d <= 0, 0, hi))
    return jnp.stack([lo, hi], axis=-1).astype(jnp.int32)


RANK_BLOCK = 1 << 20
"""Entries ranked per host ``argsort`` call (:func:`ranks`): its int64 work space stays ~16 MB."""


def _rank_keys(block: np.ndarray, bits: np.ndarray, descending: bool) -> np.ndarray:
    """Keys whose stable ascending order is the float32 order of ``block`` (descending if asked).
    In ascending order non-negative 16-bit floats (magnitudes in bf16/f16) order as their bit
    patterns, NaN last as NumPy's float sort puts it: uint16 keys, which NumPy's stable sort ranks
    by radix (3.4× faster on a 16000 × 768 bf16 tensor)."""
    if not descending and bits.dtype == np.uint16 and not np.any(bits & 0x8000):
        return bits
    keys = block.astype(np.float32)
    return -keys if descending else keys


def to_host(x: jax.Array) -> jax.Array:
    """``x``'s bytes, uint8 of shape ``x.shape + (itemsize,)`` (``x.shape`` for 1-byte dtypes): how
    an array crosses ``jax.pure_callback`` unchanged (:func:`from_host` reads it back).

    A callback's operands and results are converted in the thread that runs it, with that
    thread's ``jax_enable_x64``: under the thread-local ``jax.enable_x64`` context a thread of
    XLA's pool narrows 64-bit arrays (uint64 → uint32, float64 → float32), and XLA CPU widens a
    bf16/f16 operand to float32. Bytes are never converted."""
    return jax.lax.bitcast_convert_type(x, jnp.uint8)


def from_host(data: Any, dtype: Any) -> np.ndarray:
    """The array of ``dtype`` whose bytes :func:`to_host` gave (a host NumPy view, batch axes kept)."""
    dtype = np.dtype(dtype)
    data = np.ascontiguousarray(data).view(dtype)
    return data[..., 0] if dtype.itemsize > 1 else data


def host_bytes(x: np.ndarray) -> np.ndarray:
    """A host result's bytes in :func:`to_host`'s layout (read back on device with
    ``jax.lax.bitcast_convert_type(bytes, dtype)``)."""
    x = np.ascontiguousarray(x)
    return x.view(np.uint8).reshape(x.shape + ((x.dtype.itemsize,) if x.dtype.itemsize > 1 else ()))


def _host_ranks(data, *, descending: bool, dtype: np.dtype) -> np.ndarray:
    mag = from_host(data, dtype)
    bits = mag.view(f"u{mag.dtype.itemsize}")
    rows, row_bits = mag.reshape(-1, mag.shape[-1]), bits.reshape(-1, bits.shape[-1])
    out = np.empty(rows.shape, np.int32)
    step = max(1, RANK_BLOCK // max(rows.shape[1], 1))
    positions = np.arange(rows.shape[1], dtype=np.int32)[None]
    for start in range(0, rows.shape[0], step):
        block = slice(start, start + step)
        order = np.argsort(_rank_keys(rows[block], row_bits[block], descending), axis=-1, kind="stable")
        np.put_along_axis(out[start:start + step], order, positions, axis=-1)
    return out.reshape(mag.shape)


def ranks(mag: jax.Array, descending: bool) -> jax.Array:
    """Each entry's 0-based position (int32) in the stable sort of ``mag`` along the last axis,
    compared in float32 (equal values keep their index order).

    Ranked on the host (NumPy's stable ``argsort``, a block of rows at a time, through
    ``jax.pure_callback``, one model at a time under ``vmap``): XLA's CPU sort of a
    (3, 16000, 768) stack took 30 s and held its keys and an index per entry.
    """
    return jax.pure_callback(partial(_host_ranks, descending=bool(descending), dtype=np.dtype(mag.dtype)),
                             jax.ShapeDtypeStruct(mag.shape, jnp.int32), to_host(mag), vmap_method="sequential")


def _leading(arrays: list[np.ndarray], trailing: list[int]) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Arrays from ``jax.pure_callback(..., vmap_method="expand_dims")`` broadcast over their
    leading (batch) axes and flattened to one: (leading shape, [(B, *trailing) arrays])."""
    lead = np.broadcast_shapes(*(a.shape[:a.ndim - t] for a, t in zip(arrays, trailing)))
    flat = [np.broadcast_to(a, lead + a.shape[a.ndim - t:]).reshape((-1,) + a.shape[a.ndim - t:])
            for a, t in zip(arrays, trailing)]
    return lead, flat


def _host_windows(data, window, *, descending: bool, dtype: np.dtype) -> np.ndarray:
    lead, (mag, window) = _leading([from_host(data, dtype), np.asarray(window)], [1, 1])
    out = [sort_order.window_of_sort(m, int(w[0]), int(w[1]), descending) for m, w in zip(mag, window)]
    return np.stack(out).reshape(lead + mag.shape[1:])


def window_mask(mag: jax.Array, window: jax.Array, descending: bool) -> jax.Array:
    """Entries of the 1-D ``mag`` at positions [lo, hi) of PyTorch's CPU sort of it (mergekit's
    ``argsort(|τ|, descending=True)[:k]`` and ``sort(|τ|).indices[lo:hi]``), equal magnitudes
    at a cut kept as that sort leaves them (:mod:`swudi_jax.methods.sort_order`, on the host
    through ``jax.pure_callback``; jit- and vmap-able, ``window`` may be traced). Under
    ``vmap`` the host ranks one model at a time, so it holds one model's magnitudes."""
    return jax.pure_callback(partial(_host_windows, descending=bool(descending), dtype=np.dtype(mag.dtype)),
                             jax.ShapeDtypeStruct(mag.shape, jnp.bool_), to_host(mag), jnp.asarray(window, jnp.int32),
                             vmap_method="sequential")


def _host_topk(data, count, *, dtype: np.dtype) -> np.ndarray:
    lead, (values, count) = _leading([from_host(data, dtype), np.asarray(count)], [1, 0])
    out = [sort_order.topk_mask(v, int(k)) for v, k in zip(values, count)]
    return np.stack(out).reshape(lead + values.shape[1:])


def topk_mask(values: jax.Array, count: jax.Array) -> jax.Array:
    """Mask of the ``count`` entries of the 1-D ``values`` that PyTorch's CPU ``topk`` returns
    (ties as its selection leaves them; host NumPy through ``jax.pure_callback``)."""
    return jax.pure_callback(partial(_host_topk, dtype=np.dtype(values.dtype)),
                             jax.ShapeDtypeStruct(values.shape, jnp.bool_), to_host(values),
                             jnp.asarray(count, jnp.int32), vmap_method="expand_dims")


def rounder(dtype) -> Callable[[jax.Array], jax.Array]:
    """``x ↦ x`` rounded to ``dtype``'s precision (:func:`~swudi_jax.maths.linalg.round_to`;
    the identity for float32/float64): where mergekit's PyTorch code rounds an operation's result."""
    return partial(round_to, dtype=dtype)


def _rescale(x: jax.Array, kept: jax.Array, keep_prob: jax.Array | None, norm: str | None,
             rnd: Callable) -> jax.Array:
    """One model's survivors ``kept`` (= mask ⊙ x, work dtype) rescaled by ``norm``."""
    if norm is None:
        return kept
    if norm == "keep_prob":
        return rnd(kept / jnp.where(keep_prob > 0, keep_prob, 1))
    if norm == "l1":
        before, after = rnd(jnp.sum(jnp.abs(x))), rnd(jnp.sum(jnp.abs(kept)))
    elif norm == "l2":
        before, after = rnd(jnp.sqrt(jnp.sum(jnp.square(x)))), rnd(jnp.sqrt(jnp.sum(jnp.square(kept))))
    else:
        before, after = jnp.max(jnp.abs(x)), jnp.max(jnp.abs(kept))
    small = (before < RESCALE_EPS) | (after < RESCALE_EPS)
    ratio = rnd(before / jnp.where(small, 1, after))
    return jnp.where(small, kept, rnd(kept * ratio))


def _della_keep_prob(x: jax.Array, density: jax.Array, epsilon: jax.Array, rndp: Callable) -> jax.Array:
    """DELLA's per-entry keep probability, ranked along axis 1 (1-D: one row).

    Operation by operation as mergekit: (rank + 1), (r − min r)/(max r − min r), then
    (d − ε) + (r̂·2)·ε, each rounded by ``rndp`` (to bf16 for bf16 tensors, as mergekit's
    bf16 path computes them, d − ε included; float32 otherwise).
    """
    rows = x.reshape(1, -1) if x.ndim < 2 else x
    moved = jnp.moveaxis(jnp.abs(rows), 1, -1)  # ranked in float32 (mergekit's ``abs().float()``)
    n = moved.shape[-1]
    r = rndp(rndp(ranks(moved, descending=False).astype(jnp.float32)) + 1)
    # the ranks of a row are 0..n−1 and the rounding is monotone: min r and max r are those of 0 and
    # n − 1 (scalars: the row reductions would keep r whole in memory)
    lo, hi = (rndp(rndp(jnp.float32(v)) + 1) for v in (0, n - 1))
    if n > 1:
        norm_rank = jnp.clip(rndp(rndp(r - lo) / rndp(hi - lo)), 0, 1)
    else:
        norm_rank = jnp.zeros_like(r)
    # PyTorch's bf16 add rounds a Python scalar operand to bf16 first (its multiply does not)
    p = rndp(rndp(density - epsilon) + rndp(rndp(norm_rank * 2) * epsilon))
    return jnp.moveaxis(p, -1, 1).reshape(x.shape)


def _sparsify_one(x, density, gamma, epsilon, window, u, *, method: str, rescale: str | None):
    """One model's tensor x (any shape) sparsified; the scalars are this model's parameters."""
    rnd = rounder(x.dtype)
    rndp = rounder(jnp.bfloat16) if x.dtype == jnp.bfloat16 else (lambda v: v)
    xw = x.astype(compute_dtype(x.dtype))
    zero = jnp.zeros_like(xw)
    if method in _RANKED:
        mag = jnp.abs(x).reshape(-1)  # exact in x's dtype; the host ranks it in float32 (float64 for float64)
        keep = window_mask(mag, window, descending=(method == "magnitude")).reshape(x.shape)
        prob = None
    elif method == "random":
        prob = rndp(density.astype(jnp.float32))
        keep = u < prob
    else:
        prob = _della_keep_prob(x, density.astype(jnp.float32), epsilon.astype(jnp.float32), rndp)
        keep = u < prob
    # mergekit's random sparsifiers work in float32 for float16 tensors (PyTorch's CPU path)
    # and round once at the end; everything else rescales in the tensor's dtype
    rescale_rnd = (lambda v: v) if (method not in _RANKED and x.dtype == jnp.float16) else rnd
    out = _rescale(xw, jnp.where(keep, xw, zero), prob, rescale, rescale_rnd)
    if method not in _RANKED:  # ranked methods: the window alone decides (d >= 1 keeps [0, D))
        out = jnp.where(density >= 1, xw, jnp.where(density <= 0, zero, out))
    return out.astype(x.dtype)


@partial(jax.jit, static_argnames=("method", "rescale"))
def _sparsify_core(tau, density, gamma, epsilon, windows, uniforms, key, *, method, rescale):
    """The models side by side (``vmap``) for the ranked sparsifiers, whose host cut takes one model
    at a time anyway; one after the other (``lax.map``) for the random ones, so that a model's
    ranks, uniforms and work-dtype copies are held for one model at a time, not for the stack."""
    fn = partial(_sparsify_one, method=method, rescale=rescale)
    if method in _RANKED:
        return jax.vmap(fn)(tau, density, gamma, epsilon, windows, jnp.zeros(tau.shape[:1], jnp.float32))

    # the stack enters the loop as its bit pattern: XLA CPU would otherwise widen a bf16 stack to
    # float32 whole before the loop (the body's conversion hoisted), holding twice its bytes
    bits = jax.lax.bitcast_convert_type(tau, jnp.dtype(f"uint{8 * tau.dtype.itemsize}"))

    def one(i):
        u = uniforms[i] if uniforms is not None else _model_uniforms(key, i, tau.shape[1:])
        x = jax.lax.bitcast_convert_type(bits[i], tau.dtype)
        return fn(x, density[i], gamma[i], epsilon[i], windows[i], u)

    return jax.lax.map(one, jnp.arange(tau.shape[0]))


def check_rescale(rescale: bool | str | None) -> str | None:
    """mergekit's ``rescale`` flag (True → "l1") or a norm name, as a norm name or None."""
    if rescale is True:
        return "l1"
    if rescale is False or rescale is None:
        return None
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be true, false or one of {list(RESCALES)}, got {rescale!r}")
    return rescale


UNIFORM_BLOCK = 1 << 20
"""Entries drawn per :func:`jax.random.uniform` call in :func:`draw_uniforms`."""


def _rows_per_draw(rows: int, per_row: int) -> int:
    """The largest divisor of ``rows`` whose block holds at most :data:`UNIFORM_BLOCK` entries (≥ 1)."""
    for block in range(max(1, min(rows, UNIFORM_BLOCK // max(per_row, 1))), 0, -1):
        if rows % block == 0:
            return block
    return 1


def draw_uniforms(key: jax.Array | None, shape: tuple[int, ...], uniforms: Any = None) -> jax.Array:
    """The uniforms in [0, 1) behind a random mask: ``uniforms`` if given, else from ``key``.

    Drawn block by block: model i's rows [j·b, (j + 1)·b) are ``jax.random.uniform(fold_in(fold_in(key,
    i), j), (b, ...))`` with b the largest divisor of the row count whose block holds at most
    :data:`UNIFORM_BLOCK` entries (a function of the shape alone, so deterministic given the key). One
    draw over a whole (3, 16000, 768) stack held five stack-sized uint32 arrays of threefry's work at
    once (590 MB); a block's work space is a few MB.
    """
    if uniforms is not None:
        uniforms = jnp.asarray(uniforms, jnp.float32)
        if uniforms.shape != tuple(shape):
            raise ValueError(f"uniforms must have the task vectors' shape {tuple(shape)}, got {uniforms.shape}")
        return uniforms
    if key is None:
        raise ValueError("a random sparsifier needs a PRNG key (key=jax.random.key(seed)) or uniforms")
    return jax.lax.map(lambda i: _model_uniforms(key, i, tuple(shape[1:])), jnp.arange(shape[0]))


def _model_uniforms(key: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Model i's uniforms of :func:`draw_uniforms` (``shape``: one model's tensor)."""
    rows, rest = (shape[0], shape[1:]) if shape else (1, ())
    block = _rows_per_draw(rows, math.prod(rest))
    per_model = jax.random.fold_in(key, i)
    blocks = jax.lax.map(lambda j: jax.random.uniform(jax.random.fold_in(per_model, j), (block, *rest), jnp.float32),
                         jnp.arange(rows // block))
    return blocks.reshape(shape)


def check_sparsify_params(method: str, density: Any, gamma: Any, epsilon: Any) -> None:
    """Concrete (host) parameters checked as mergekit does; traced ones are trusted."""
    d = _host(density)
    if d is not None and not np.all(np.isfinite(d)):
        raise ValueError(f"density must be finite, got {d.tolist()}")
    if d is not None and np.any(d < 0):
        raise ValueError(f"density must be >= 0, got {d.tolist()}")
    g = _host(gamma)
    if method == "magnitude_outliers" and g is not None and (np.any(g < 0) or np.any(g > 1)):
        raise ValueError(f"gamma must lie in [0, 1], got {g.tolist()}")
    e = _host(epsilon)
    if method == "della_magprune" and d is not None and e is not None:
        active = (d > 0) & (d < 1)
        bad = active & ((d + e >= 1) | (d - e <= 0))
        if np.any(bad):
            raise ValueError(
                f"epsilon must be chosen such that density ± epsilon lies in (0, 1) "
                f"(models {np.flatnonzero(bad).tolist()}: density {d[bad].tolist()}, epsilon {e[bad].tolist()})"
            )


def sparsify(
    tau: jax.Array,
    method: str,
    density: Any,
    *,
    gamma: Any = 0.0,
    epsilon: Any = 0.0,
    rescale: bool | str | None = None,
    key: jax.Array | None = None,
    uniforms: Any = None,
    windows: Any = None,
) -> jax.Array:
    """Sparsify each model's task vector of one tensor (see the module docstring).

    Args:
      tau: task vectors (N, ...) of one tensor.
      method: one of :data:`SPARSIFIERS`.
      density: d, a scalar or (N,) per-model array. gamma, epsilon: likewise, for
        "magnitude_outliers" and "della_magprune".
      rescale: True ("l1", mergekit), False/None, or one of :data:`RESCALES`.
      key: PRNG key for "random" and "della_magprune" (or give ``uniforms`` (N, ...)).
      windows: optional int (N, 2) from :func:`rank_windows` for the ranked sparsifiers; when
        given it alone decides what is kept (``density`` and ``gamma`` are then unused).
    Returns:
      (N, ...) in ``tau``'s dtype.
    """
    if method not in SPARSIFIERS:
        raise ValueError(f"sparsification method must be one of {list(SPARSIFIERS)}, got {method!r}")
    norm = check_rescale(rescale)
    if norm == "keep_prob" and method in _RANKED:
        raise ValueError(f"rescale='keep_prob' applies to random sparsifiers, not {method!r}")
    n, size = tau.shape[0], math.prod(tau.shape[1:])
    density = per_model(density, n, "density")
    gamma = per_model(gamma, n, "gamma")
    epsilon = per_model(epsilon, n, "epsilon")
    check_sparsify_params(method, density, gamma, epsilon)
    if method in _RANKED:
        if windows is None:
            if isinstance(density, np.ndarray) and isinstance(gamma, np.ndarray):
                windows = rank_windows(method, density, size, gamma)
            else:
                windows = _traced_windows(method, jnp.asarray(density), size, jnp.asarray(gamma))
        uniforms, key = None, None
    else:
        windows = jnp.zeros((n, 2), jnp.int32)
        if uniforms is not None:
            uniforms, key = draw_uniforms(None, tau.shape, uniforms), None
        elif key is None:
            draw_uniforms(key, tau.shape)  # refuses, naming what is missing
    return _sparsify_core(
        tau, jnp.asarray(density, jnp.float32), jnp.asarray(gamma, jnp.float32),
        jnp.asarray(epsilon, jnp.float32), jnp.asarray(windows, jnp.int32), uniforms, key,
        method=method, rescale=norm,
    )


def variance_topk_mask(tau: jax.Array, density: Any, rnd: Callable | None = None) -> jax.Array:
    """SCE's selection mask (...,): the ⌊d·#{var ≠ 0}⌋ entries of largest variance over models.

    var is the population variance over axis 0 (rounded by ``rnd`` to the storage
    precision, as mergekit's bf16 path has it); d ≥ 1 keeps everything, d ≤ 0 nothing. The
    count is data-dependent, so it is computed in float32 in the graph.
    """
    work = compute_dtype(tau.dtype)
    mean = sum_leading(tau, work) / tau.shape[0]  # jnp.var's two passes, summed slice by slice (no widened stack)
    var = sum_leading(jnp.stack([jnp.square(tau[i].astype(work) - mean) for i in range(tau.shape[0])])) / tau.shape[0]
    var = (rnd or (lambda v: v))(var)
    flat = jnp.abs(var).reshape(-1)
    d = jnp.asarray(density, jnp.float32)
    k = jnp.floor(jnp.sum(var != 0).astype(jnp.float32) * d).astype(jnp.int32)
    keep = topk_mask(flat, k)
    keep = jnp.where(d >= 1, True, jnp.where(d <= 0, False, keep))
    return keep.reshape(var.shape)


__all__ = [
    "RESCALES",
    "SPARSIFIERS",
    "check_rescale",
    "draw_uniforms",
    "from_host",
    "host_bytes",
    "per_model",
    "rank_windows",
    "ranks",
    "rounder",
    "sparsify",
    "to_host",
    "topk_mask",
    "variance_topk_mask",
    "window_mask",
]
