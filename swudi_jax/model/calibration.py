"""Calibration statistics for Flax Linen models: per-task input Grams of every Dense layer.

The data methods (RegMean, Jin et al. ICLR 2023; output-space projection, Evans et al.
arXiv 2605.29101) need, for every linear layer and task k, the Gram of the layer's inputs
on that task's calibration data, Gk = Σ x xᵀ (n×n, maths layout input side), and the number
of tokens it summed. They are captured with Flax's own method interception
(``nn.intercept_methods`` on ``nn.Dense.__call__``), so the model is never re-implemented;
each batch is reduced to its Grams inside one jit-compiled call and added to a running sum,
so activations of more than one batch are never held at once.

Layers are keyed by the flat path of their kernel in the variables pytree the caller
passes, "/"-separated (``"params/dense_0/kernel"``: ``prefix`` + module path + "kernel"),
which is the key :func:`swudi_jax.merge` expects in its ``grams`` mapping.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import HIGHEST, compute_dtype
from swudi_jax.model.flat import flatten, signature

ApplyFn = Callable[[Any, Any], Any]
"""``apply_fn(variables, batch) -> outputs``, e.g. ``lambda v, x: model.apply(v, x)``."""


def kernel_path(module: nn.Module, prefix: str) -> str:
    """The flat "/" path of a Dense module's kernel: ``prefix/<module path>/kernel``."""
    parts = ((prefix,) if prefix else ()) + tuple(module.path) + ("kernel",)
    return "/".join(parts)


def _flat_shapes(variables) -> dict[str, tuple[int, ...]]:
    return {path: shape for path, (shape, _) in signature(flatten(variables)[0]).items()}


def dense_io(apply_fn: ApplyFn, variables, batch, *, prefix: str = "params",
             layers: Sequence[str] | None = None) -> dict[str, tuple]:
    """Each Dense layer's inputs and outputs on ``batch``, in forward (call) order.

    Runs ``apply_fn(variables, batch)`` under ``nn.intercept_methods``; traceable (use it
    inside ``jax.jit``). Inputs and outputs are flattened to (tokens, features); a module
    called twice contributes the concatenation of its calls.

    Args:
      apply_fn: ``apply_fn(variables, batch)``.
      variables: the model's variables (the pytree that is merged).
      batch: one calibration batch, anything ``apply_fn`` takes.
      prefix: the collection the kernels live under in ``variables`` ("params"; "" when
        ``variables`` is the bare params dict).
      layers: kernel paths to record (default: every Dense layer).
    Returns:
      ``{kernel path: (x (T, n), y (T, m))}`` in the order the layers were called.
    Raises:
      ValueError: a layer's input feature size differs from its kernel's input size.
    """
    shapes = _flat_shapes(variables)
    wanted = None if layers is None else set(layers)
    record: dict[str, list] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, nn.Dense) and context.method_name == "__call__") or not args:
            return next_fun(*args, **kwargs)
        path = kernel_path(module, prefix)
        if wanted is not None and path not in wanted:
            return next_fun(*args, **kwargs)
        x = args[0]
        kernel = shapes.get(path)
        if kernel is None:
            raise ValueError(
                f"Dense layer {path!r} has no kernel at that path in the variables "
                f"(check prefix={prefix!r}); known kernels: {sorted(p for p in shapes if p.endswith('kernel'))}"
            )
        if x.shape[-1] != kernel[0]:
            raise ValueError(
                f"layer {path!r}: calibration input has feature size {x.shape[-1]} "
                f"(input shape {tuple(x.shape)}) but the kernel {kernel} expects {kernel[0]}"
            )
        y = next_fun(*args, **kwargs)
        record.setdefault(path, []).append((x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])))
        return y

    with nn.intercept_methods(interceptor):
        apply_fn(variables, batch)
    return {
        path: tuple(jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0] for parts in zip(*calls))
        for path, calls in record.items()
    }


def gram(x: jax.Array) -> jax.Array:
    """Σ x xᵀ over the rows of x (T, n) in the compute dtype: (n, n)."""
    x = x.astype(compute_dtype(x.dtype))
    return jnp.matmul(x.T, x, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("apply_fn", "prefix", "layers"))
def batch_grams(apply_fn: ApplyFn, variables, batch, *, prefix: str = "params",
                layers: tuple[str, ...] | None = None):
    """One batch reduced to ``({path: Gram (n, n)}, {path: token count})`` (jit-compiled).

    ``apply_fn`` is a static argument: pass the same function object every call (not a new
    lambda) so the compiled computation is reused.
    """
    io = dense_io(apply_fn, variables, batch, prefix=prefix, layers=layers)
    return {p: gram(x) for p, (x, _) in io.items()}, {p: x.shape[0] for p, (x, _) in io.items()}


def layer_order(apply_fn: ApplyFn, variables, batch, *, prefix: str = "params") -> list[str]:
    """The kernel paths of the Dense layers in the order a forward pass calls them."""
    order: list[str] = []

    def probe(v, b):
        order.extend(dense_io(apply_fn, v, b, prefix=prefix))  # a dict output would come back key-sorted
        return 0

    jax.eval_shape(probe, variables, batch)
    return order


class Calibration(NamedTuple):
    """Per-task input Grams of every Dense layer, as sums, with the token counts behind them.

    Attributes:
      grams: ``{kernel path: (K, n, n)}`` Gk = Σ x xᵀ over task k's calibration tokens.
      counts: ``{kernel path: (K,)}`` the number of tokens each Gram sums.
    """

    grams: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]

    def mean_grams(self) -> dict[str, np.ndarray]:
        """Gk / (tokens of task k): tasks weigh equally whatever their calibration size."""
        return {p: g / self.counts[p][:, None, None] for p, g in self.grams.items()}


def input_grams(apply_fn: ApplyFn, variables, batches: Iterable, *, prefix: str = "params",
                layers: Sequence[str] | None = None, task: int = 0) -> tuple[dict, dict]:
    """One task's Grams, accumulated batch by batch: ``({path: (n, n)}, {path: tokens})``.

    Raises:
      ValueError: no batches; wrong feature size; NaN/Inf activations (naming layer and task).
    """
    layers = None if layers is None else tuple(layers)
    total: dict[str, jax.Array] = {}
    counts: dict[str, int] = {}
    n_batches = 0
    for batch in batches:
        try:
            grams, tokens = batch_grams(apply_fn, variables, batch, prefix=prefix, layers=layers)
        except ValueError as exc:
            raise ValueError(f"task {task}, batch {n_batches}: {exc}") from None
        for path, g in grams.items():
            total[path] = total[path] + g if path in total else g
            counts[path] = counts.get(path, 0) + int(tokens[path])
        n_batches += 1
    if n_batches == 0:
        raise ValueError(f"task {task}: no calibration batches (an empty iterable was given)")
    host = {path: np.asarray(g) for path, g in total.items()}
    for path, g in host.items():
        if not np.isfinite(g).all():
            raise ValueError(
                f"task {task}: layer {path!r} received NaN/Inf activations on its calibration data "
                f"({int((~np.isfinite(g)).sum())} non-finite Gram entries)"
            )
    return host, counts


def task_grams(apply_fn: ApplyFn, variables: Any, batches_per_task: Sequence[Iterable], *,
               prefix: str = "params", layers: Sequence[str] | None = None) -> Calibration:
    """Per-task Grams of every Dense layer: expert k (or one shared model) on task k's batches.

    Args:
      apply_fn: ``apply_fn(variables, batch)``.
      variables: a sequence of K variable pytrees (expert k runs on task k's data: RegMean's
        Grams) or one pytree used for every task (e.g. the merged model: RegMean++).
      batches_per_task: K iterables of batches.
      prefix, layers: see :func:`dense_io`.
    Returns:
      A :class:`Calibration` with (K, n, n) Grams and (K,) token counts per layer.
    """
    n_tasks = len(batches_per_task)
    if n_tasks == 0:
        raise ValueError("batches_per_task is empty: give one iterable of calibration batches per task")
    per_task = isinstance(variables, (list, tuple))
    if per_task and len(variables) != n_tasks:
        raise ValueError(f"got {len(variables)} variable pytrees for {n_tasks} tasks' batches")
    results = [
        input_grams(apply_fn, variables[k] if per_task else variables, batches, prefix=prefix,
                    layers=layers, task=k)
        for k, batches in enumerate(batches_per_task)
    ]
    paths = list(results[0][0])
    for k, (grams, _) in enumerate(results):
        if list(grams) != paths:
            raise ValueError(f"task {k}: the model called Dense layers {list(grams)}, task 0 called {paths}")
    return Calibration(
        grams={p: np.stack([r[0][p] for r in results]) for p in paths},
        counts={p: np.asarray([r[1][p] for r in results]) for p in paths},
    )


__all__ = [
    "ApplyFn",
    "Calibration",
    "batch_grams",
    "dense_io",
    "gram",
    "input_grams",
    "kernel_path",
    "layer_order",
    "task_grams",
]
