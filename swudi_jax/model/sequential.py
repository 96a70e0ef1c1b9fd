"""Layer-wise data merging of deep Flax models: sequential output-space projection, RegMean++.

Source: Evans et al., "Model Merging by Output-Space Projection" (arXiv 2605.29101) for the
sequential scheme (its details are our reconstruction, design MATH.md §6); RegMean++
(Grams from the merged model's activations) after Jin et al.'s RegMean (ICLR 2023).

The Dense layers are merged one at a time in forward order. For layer ℓ and task k the
inputs X come from

- ``inputs="merged"`` (sequential): the model whose layers before ℓ are already merged, so a
  layer is fitted to the inputs it will actually receive;
- ``inputs="experts"`` (one pass): expert k's own activations, every layer independently.

and the targets T of the residual fit min Σk ωk ‖Δ X − T‖² are

- ``targets="local"``: the expert layer applied to those inputs, T = Δk X;
- ``targets="global"``: expert k's own output of layer ℓ on the same batch, minus the base
  layer on X: T = Yk − W0 X − b (b the merged bias).

Statistics are accumulated batch by batch and divided by each task's token count. Every
other floating leaf (biases, norms) takes the mean task vector (RegMean's convention).
ρ per layer is the captured residual-energy fraction 1 − L(Δ)/E on the data it was fitted to.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from swudi_jax.model.calibration import ApplyFn, dense_io, gram, layer_order
from swudi_jax.model.flat import check_compatible, flatten, nest, signature
from swudi_jax.methods.output_space import (
    check_row_systems_regular,
    check_weights,
    qp_merge,
    residual_energy_score,
    residual_loss,
    rotated_systems,
)
from swudi_jax.methods.regmean import check_denominator_regular, regmean_merge
from swudi_jax.methods.registry import resolve_options
from swudi_jax.maths.linalg import HIGHEST, compute_dtype, is_floating
from swudi_jax.maths.validation import check_choice, check_number

METHODS = ("output_space", "regmean")
INPUTS = ("merged", "experts")
TARGETS = ("local", "global")


class LayerwiseResult(NamedTuple):
    """The merged variables and, per Dense kernel path in forward order, its ρ."""

    variables: Any
    rho: dict[str, float]


class LayerStats(NamedTuple):
    """One layer's per-task calibration moments (leading axis K), divided by token counts."""

    grams: jnp.ndarray  # (K, n, n)   X Xᵀ
    cross: jnp.ndarray | None  # (K, n, m) X Tᵀ (global targets)
    energy: jnp.ndarray | None  # (K,)  ‖T‖²
    target_gram: jnp.ndarray | None  # (K, m, m) T Tᵀ


@functools.partial(jax.jit, static_argnames=("apply_fn", "prefix", "path", "targets"))
def _batch_moments(apply_fn, input_vars, target_vars, batch, kernel0, bias, *, prefix, path, targets):
    x, _ = dense_io(apply_fn, input_vars, batch, prefix=prefix, layers=(path,))[path]
    moments = {"grams": gram(x), "tokens": x.shape[0]}
    if targets == "global":
        _, y = dense_io(apply_fn, target_vars, batch, prefix=prefix, layers=(path,))[path]
        x = x.astype(compute_dtype(x.dtype))
        t = y.astype(x.dtype) - jnp.matmul(x, kernel0.astype(x.dtype), precision=HIGHEST) - bias.astype(x.dtype)
        moments.update(
            cross=jnp.matmul(x.T, t, precision=HIGHEST),
            energy=jnp.sum(t * t),
            target_gram=jnp.matmul(t.T, t, precision=HIGHEST),
        )
    return moments


def _layer_stats(apply_fn, input_vars: Sequence, target_vars: Sequence, batches_per_task, kernel0, bias,
                 *, prefix: str, path: str, targets: str) -> LayerStats:
    per_task = []
    for k, batches in enumerate(batches_per_task):
        total, tokens = None, 0
        for b, batch in enumerate(batches):
            try:
                moments = _batch_moments(apply_fn, input_vars[k], target_vars[k], batch, kernel0, bias,
                                         prefix=prefix, path=path, targets=targets)
            except ValueError as exc:
                raise ValueError(f"task {k}, batch {b}: {exc}") from None
            tokens += int(moments.pop("tokens"))
            total = moments if total is None else jax.tree.map(jnp.add, total, moments)
        if total is None:
            raise ValueError(f"task {k}: no calibration batches for layer {path!r}")
        for name, value in total.items():
            if not np.isfinite(np.asarray(value)).all():
                raise ValueError(f"task {k}: layer {path!r} received NaN/Inf activations ({name} not finite)")
        per_task.append(jax.tree.map(lambda v: v / tokens, total))
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *per_task)
    return LayerStats(stacked["grams"], stacked.get("cross"), stacked.get("energy"), stacked.get("target_gram"))


def merge_layer(tau, stats: LayerStats, weights, *, method: str, options: dict):
    """Merge one layer from its statistics: ``(Δ (m, n), ρ)`` (maths layout, compute dtype)."""
    if method == "output_space":
        merged, rho, _ = qp_merge(tau, stats.grams, weights, basis=options["basis"], ridge=options["ridge"],
                                  fallback_weight=options["fallback_weight"], cross=stats.cross,
                                  target_energy=stats.energy, target_gram=stats.target_gram)
        return merged, rho
    merged = regmean_merge(tau, stats.grams, weights, options["alpha"], options["ridge"], stats.cross)
    loss, energy = residual_loss(merged, tau, stats.grams, weights, stats.cross, stats.energy)
    return merged, jnp.where(energy > 0, 1.0 - loss / jnp.where(energy > 0, energy, 1.0), jnp.nan)


def _resolve(method: str, options: dict) -> dict:
    check_choice(method, "method", METHODS)
    return resolve_options(method, options)


def _flatten(tree) -> dict[str, Any]:
    return flatten(tree)[0]


def _check_models(base_flat: dict, expert_flats: list[dict], n_tasks: int) -> None:
    if len(expert_flats) < 2:
        raise ValueError(f"need at least 2 experts, got {len(expert_flats)}")
    if len(expert_flats) != n_tasks:
        raise ValueError(f"got {len(expert_flats)} experts but {n_tasks} tasks' calibration batches")
    check_compatible(signature(base_flat), [signature(f) for f in expert_flats],
                     [f"expert {k}" for k in range(len(expert_flats))], "the base", dtypes=False)


def _mean_merged(base_flat: dict, expert_flats: list[dict]) -> dict:
    """base + mean task vector on floating leaves (= the experts' average); others from base."""
    merged = {}
    for path, value in base_flat.items():
        if is_floating(jnp.asarray(value).dtype):
            mean = sum(jnp.asarray(f[path], jnp.float32) for f in expert_flats) / len(expert_flats)
            merged[path] = mean.astype(jnp.asarray(value).dtype)
        else:
            merged[path] = value
    return merged


def layerwise_merge(apply_fn: ApplyFn, base: Any, experts: Sequence[Any], batches_per_task: Sequence[Iterable], *,
                    method: str = "output_space", inputs: str = "merged", targets: str = "local",
                    weights: ArrayLike | Sequence[float] | None = None, scale: float = 1.0, prefix: str = "params",
                    **options: Any) -> LayerwiseResult:
    """Merge a Flax model's Dense layers one by one in forward order from calibration data.

    ``inputs="merged"`` is the sequential algorithm (RegMean++ with ``method="regmean"``);
    ``inputs="experts"`` the one-pass version (plain RegMean / output-space QP per layer).
    See the module docstring for the targets. Batches are re-iterated once per layer, so
    pass re-iterable sequences (lists), not generators.

    Args:
      apply_fn: ``apply_fn(variables, batch)``; a stable function object (it is a static
        argument of the compiled per-batch statistics).
      base: the pre-trained variables pytree; experts: K fine-tuned pytrees of its structure.
      batches_per_task: K sequences of calibration batches, task k's for expert k.
      method: "output_space" (diagonal QP; options basis, ridge, fallback_weight) or
        "regmean" (options alpha, ridge).
      weights: optional (K,) task weights ωk.
      scale: s in kernel = W0 + s·Δ.
      prefix: the collection of the kernels in the variables ("params").
    Returns:
      :class:`LayerwiseResult` (merged variables, ρ per Dense kernel path).
    """
    check_choice(inputs, "inputs", INPUTS)
    check_choice(targets, "targets", TARGETS)
    check_number(scale, "scale")
    resolved = _resolve(method, options)
    batches_per_task = [list(b) for b in batches_per_task]
    base_flat = _flatten(base)
    expert_flats = [_flatten(e) for e in experts]
    _check_models(base_flat, expert_flats, len(batches_per_task))
    weights = check_weights(weights, len(expert_flats))
    for k, batches in enumerate(batches_per_task):
        if not batches:
            raise ValueError(f"task {k}: no calibration batches")
    try:
        order = layer_order(apply_fn, base, batches_per_task[0][0], prefix=prefix)
    except ValueError as exc:
        raise ValueError(f"task 0, batch 0: {exc}") from None

    merged_flat = _mean_merged(base_flat, expert_flats)
    rho: dict[str, float] = {}
    for path in order:
        kernel0 = jnp.asarray(base_flat[path])
        dtype = compute_dtype(kernel0.dtype)
        bias_path = path[: -len("kernel")] + "bias"
        bias = merged_flat.get(bias_path, jnp.zeros(kernel0.shape[-1], dtype))
        current = nest(merged_flat)
        input_vars = [current] * len(experts) if inputs == "merged" else list(experts)
        stats = _layer_stats(apply_fn, input_vars, list(experts), batches_per_task, kernel0, bias,
                             prefix=prefix, path=path, targets=targets)
        tau = jnp.stack([jnp.asarray(f[path], dtype) - kernel0.astype(dtype) for f in expert_flats]).swapaxes(1, 2)
        w = jnp.ones(len(expert_flats), dtype) if weights is None else jnp.asarray(weights, dtype)
        if method == "output_space" and resolved["ridge"] == 0:
            systems = rotated_systems(tau, stats.grams, w, basis=resolved["basis"], cross=stats.cross,
                                      target_energy=stats.energy, target_gram=stats.target_gram)[2]
            check_row_systems_regular(systems, path)
        if method == "regmean" and resolved["alpha"] == 1 and resolved["ridge"] == 0:
            check_denominator_regular(stats.grams, w, 1.0, path)
        delta, layer_rho = _merge_layer_jit(tau, stats, w, method, tuple(sorted(resolved.items())))
        merged_flat[path] = (kernel0.astype(dtype) + scale * delta.T).astype(kernel0.dtype)
        rho[path] = float(layer_rho)
    return LayerwiseResult(nest(merged_flat), rho)


@functools.partial(jax.jit, static_argnames=("method", "options"))
def _merge_layer_jit(tau, stats, weights, method, options):
    return merge_layer(tau, stats, weights, method=method, options=dict(options))


def layer_scores(base: Any, experts: Sequence[Any], merged: Any, grams: dict[str, Any], *,
                 weights: ArrayLike | Sequence[float] | None = None) -> dict[str, float]:
    """ρ(Δ) = 1 − L(Δ)/E of every Dense kernel in ``grams`` for any merged model.

    Δ = merged kernel − base kernel, scored against the experts' task vectors with the
    per-task Grams ``grams[path]`` (K, n, n) (e.g. ``Calibration.mean_grams()``): the
    diagnostic that puts every method, data-free or not, on one scale per layer.
    """
    base_flat, merged_flat = _flatten(base), _flatten(merged)
    expert_flats = [_flatten(e) for e in experts]
    scores = {}
    for path, g in grams.items():
        if path not in base_flat:
            raise ValueError(f"grams has layer {path!r}, which the base model lacks")
        kernel0 = np.asarray(base_flat[path], np.float64)
        tau = np.stack([np.asarray(f[path], np.float64) - kernel0 for f in expert_flats]).swapaxes(1, 2)
        delta = (np.asarray(merged_flat[path], np.float64) - kernel0).T
        dtype = compute_dtype(jnp.asarray(base_flat[path]).dtype)
        scores[path] = float(residual_energy_score(delta.astype(dtype), tau.astype(dtype),
                                                   np.asarray(g).astype(dtype), weights=weights))
    return scores


__all__ = [
    "INPUTS",
    "METHODS",
    "TARGETS",
    "LayerStats",
    "LayerwiseResult",
    "layer_scores",
    "layerwise_merge",
    "merge_layer",
]
