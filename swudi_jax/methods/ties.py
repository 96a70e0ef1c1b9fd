"""TIES-merging: trim, elect sign, disjoint merge.

Source: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
(NeurIPS 2023, arXiv 2306.01708). Per task keep the k = ⌊density·D⌋ largest magnitudes
(|τi| ≥ the k-th largest |τi|, k ≥ 1), elect each entry's sign by mass,
γ = sign(Σi τ̂i), and average only the kept entries that agree with it:

    τm = Σi τ̂i·1[sign τ̂i = γ] / max(#{i : τ̂i ≠ 0, sign τ̂i = γ}, 1),   θ = θ0 + λ τm

with density 0.2 and λ = 1. The paper trims over the whole flattened model
(``trim="model"``, the default: the D entries are all merged entries of the model, see
:func:`ties_model_thresholds`); mergekit trims each tensor on its own (``trim="tensor"``).
Magnitudes are compared in float32. An entry whose trimmed values sum to exactly 0 elects
no sign and merges to 0. (The reference code's ``kthvalue`` keeps one entry more than k
when magnitudes are distinct; we keep k, as the paper and mergekit do.)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.methods.spec import LOCAL, Combine, MethodSpec, Preparation
from swudi_jax.maths.validation import check_choice, check_number, is_concrete

TRIMS = ("model", "tensor")
DEFAULT_DENSITY = 0.2
_HALF_BITS = 16


def kept_count(size: int, density: float) -> int:
    """k = max(1, ⌊density · size⌋): how many magnitudes of ``size`` entries TIES keeps."""
    return max(1, int(math.floor(density * size)))


def tensor_thresholds(tau: jax.Array, density: float) -> jax.Array:
    """Per task, the k-th largest |τi| over the tensor (mergekit's per-tensor trim): (N,)."""
    flat = jnp.abs(tau.reshape(tau.shape[0], -1)).astype(jnp.float32)
    k = kept_count(flat.shape[1], density)
    return jnp.sort(flat, axis=1)[:, flat.shape[1] - k]


def disjoint_merge(trimmed: jax.Array) -> jax.Array:
    """Sign election by mass and the disjoint mean of the agreeing non-zero entries."""
    elected = jnp.sign(jnp.sum(trimmed, axis=0))
    agree = (jnp.sign(trimmed) == elected) & (trimmed != 0)
    total = jnp.sum(jnp.where(agree, trimmed, 0), axis=0)
    count = jnp.sum(agree, axis=0)
    return (total / jnp.maximum(count, 1).astype(trimmed.dtype)).astype(trimmed.dtype)


def ties(
    tau: jax.Array,
    *,
    density: float = DEFAULT_DENSITY,
    trim: str = "model",
    thresholds: jax.Array | None = None,
) -> jax.Array:
    """TIES-merging of one tensor's task vectors.

    Args:
      tau: task vectors (N, ...) of any shape.
      density: the kept fraction of magnitudes per task, in (0, 1].
      trim: "model" or "tensor" (see the module docstring). At this level, with no
        ``thresholds``, "model" means this tensor is the whole model.
      thresholds: per-task magnitude thresholds (N,) from :func:`ties_model_thresholds`
        (entries with |τi| ≥ thresholds[i] are kept); only with ``trim="model"``.
    Returns:
      The merged task vector τm, shape (...), in ``tau``'s dtype (apply λ as the scale).
    """
    return disjoint_merge(trimmed(tau, density=density, trim=trim, thresholds=thresholds))


def trimmed(
    tau: jax.Array,
    *,
    density: float = DEFAULT_DENSITY,
    trim: str = "model",
    thresholds: jax.Array | None = None,
) -> jax.Array:
    """TIES's trim step: τ̂i = τi where |τi| ≥ the task's threshold, else 0 (arguments as :func:`ties`)."""
    if thresholds is None:
        thresholds = tensor_thresholds(tau, density)
    elif trim != "model":
        raise ValueError("thresholds apply to trim='model' only; trim='tensor' computes its own")
    thresholds = jnp.asarray(thresholds, jnp.float32).reshape((-1,) + (1,) * (tau.ndim - 1))
    keep = jnp.abs(tau).astype(jnp.float32) >= thresholds
    return jnp.where(keep, tau, jnp.zeros_like(tau))


def _magnitude_bits(chunk: Any, n_tasks: int | None) -> np.ndarray:
    mags = np.abs(np.asarray(chunk, dtype=np.float32))
    if mags.ndim < 1 or (n_tasks is not None and mags.shape[0] != n_tasks):
        raise ValueError(
            f"task-vector chunks must stack the same number of tasks on axis 0; "
            f"got shape {mags.shape}, expected {n_tasks} tasks"
        )
    # Non-negative float32 values order exactly as their bit patterns read as uint32.
    return mags.reshape(mags.shape[0], -1).view(np.uint32)


def _select_bin(counts: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the bin holding the k-th largest value, and k within that bin."""
    from_top = np.cumsum(counts[:, ::-1], axis=1)
    pos = np.argmax(from_top >= k[:, None], axis=1)
    bins = counts.shape[1] - 1 - pos
    above = from_top[np.arange(len(k)), pos] - counts[np.arange(len(k)), bins]
    return bins, k - above


def ties_model_thresholds(
    task_vector_chunks: Iterable[Any] | Callable[[], Iterable[Any]], density: float = DEFAULT_DENSITY,
    combine: Combine = LOCAL,
) -> np.ndarray:
    """The whole-model TIES trim: per task, the k-th largest |τi| over all chunks.

    Exact (float32) in two passes over the chunks with bounded memory: a histogram of the
    high 16 bits of each magnitude's float32 pattern finds the bin holding the k-th
    largest value, a histogram of the low 16 bits inside that bin finds the value. The
    streaming checkpoint merger feeds it chunk by chunk.

    Args:
      task_vector_chunks: a re-iterable (list, tuple) of arrays (N, ...) — one per tensor
        or group, all with the same N — or a zero-argument callable returning a fresh
        iterable of them (it is called twice).
      density: the kept fraction per task, in (0, 1]; k = max(1, ⌊density · D⌋) with D the
        number of entries per task over all chunks.
      combine: when the chunks are one process's share of the model, how the histograms and
        entry counts meet (summed over the processes: integers, so the thresholds are exact).
    Returns:
      float32 thresholds (N,); TIES keeps entries with |τi| ≥ thresholds[i].
    """
    check_number(density, "density", low=0.0, high=1.0, low_open=True)
    if callable(task_vector_chunks):
        make_iter = task_vector_chunks
    else:
        if iter(task_vector_chunks) is task_vector_chunks:
            raise ValueError(
                "task_vector_chunks is a one-shot iterator; pass a list or a callable returning "
                "a fresh iterable (two passes are needed)"
            )
        make_iter = lambda: task_vector_chunks  # noqa: E731
    n_tasks, size, high = None, 0, None
    for chunk in make_iter():
        bits = _magnitude_bits(chunk, n_tasks)
        n_tasks, size = bits.shape[0], size + bits.shape[1]
        high = np.zeros((n_tasks, 1 << _HALF_BITS), np.int64) if high is None else high
        for i in range(n_tasks):
            high[i] += np.bincount(bits[i] >> _HALF_BITS, minlength=1 << _HALF_BITS)
    high, size = combine.sum(high), int(combine.sum(np.int64(size)))
    if high is None or size == 0:
        raise ValueError("task_vector_chunks is empty: no entries to trim")
    n_tasks = high.shape[0]
    k = np.full(n_tasks, kept_count(size, density), np.int64)
    high_bin, k_in_bin = _select_bin(high, k)
    low = np.zeros_like(high)
    for chunk in make_iter():
        bits = _magnitude_bits(chunk, n_tasks)
        for i in range(n_tasks):
            row = bits[i][(bits[i] >> _HALF_BITS) == high_bin[i]]
            low[i] += np.bincount(row & ((1 << _HALF_BITS) - 1), minlength=1 << _HALF_BITS)
    low_bin, _ = _select_bin(combine.sum(low), k_in_bin)
    pattern = (high_bin.astype(np.uint32) << _HALF_BITS) | low_bin.astype(np.uint32)
    return pattern.view(np.float32)


def _validate(options: Mapping[str, Any]) -> None:
    check_number(options["density"], "density", low=0.0, high=1.0, low_open=True)
    check_choice(options["trim"], "trim", TRIMS)
    if options["thresholds"] is not None and options["trim"] != "model":
        raise ValueError("thresholds apply to trim='model' only")
    given = options["thresholds"]
    if given is not None and is_concrete(given):
        try:
            values = None if isinstance(given, (str, bool)) else np.asarray(given, np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.ndim != 1 or not np.all(np.isfinite(values)):
            raise ValueError(f"thresholds must be a list of one finite number per model, got {given!r}")


def _model_trim(options: Mapping[str, Any]) -> Preparation | None:
    """The whole-model trim pass when ``trim="model"`` and no thresholds are given."""
    if options["trim"] != "model" or options["thresholds"] is not None:
        return None
    return Preparation("trim='model' needs the per-task thresholds of ties_model_thresholds() over the whole model",
                       lambda chunks, combine: {"thresholds": ties_model_thresholds(chunks, options["density"], combine)})


TIES = MethodSpec(
    name="ties_paper",
    fn=ties,
    kind="elementwise",
    source="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)",
    validate=_validate,
    array_options=("thresholds",),
    prepare=_model_trim,
    kept=trimmed,
)


__all__ = [
    "DEFAULT_DENSITY",
    "TIES",
    "TRIMS",
    "disjoint_merge",
    "kept_count",
    "tensor_thresholds",
    "ties",
    "ties_model_thresholds",
]
