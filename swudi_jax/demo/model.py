"""The demo's model: a shared Flax Linen MLP backbone and one linear head per task.

The usual convention of merging benchmarks: experts share a backbone that is fine-tuned and
merged, while each task keeps its own classification head (here the head its expert trained),
which is never merged. A merged model is evaluated with the merged backbone and each task's
head. Calibration Grams for the data methods are captured by
:func:`swudi_jax.model.calibration.task_grams` from the backbone's Dense layers
(:func:`dense_layers` lists their paths).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

class Backbone(nn.Module):
    """An MLP ``x → gelu(Dense) → … → gelu(Dense)``; layers are named ``dense_0, dense_1, …``.

    Attributes:
      features: the output width of each Dense layer (the last one is the feature width the
        heads read).
    """

    features: Sequence[int] = (256, 256, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for i, width in enumerate(self.features):
            h = nn.gelu(nn.Dense(width, name=f"dense_{i}")(h))
        return h


class Head(nn.Module):
    """A task's linear classifier on the backbone's features."""

    n_classes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        return nn.Dense(self.n_classes, name="classifier")(features)


def build_model(features: Sequence[int] = (256, 256, 128)) -> Backbone:
    """The demo backbone with the given layer widths (input width 64 for 8×8 digits)."""
    if not features or any(not isinstance(w, int) or w < 1 for w in features):
        raise ValueError(f"features must be a non-empty sequence of positive ints, got {features!r}")
    return Backbone(tuple(features))


def init_backbone(model: Backbone, key: jax.Array, n_inputs: int) -> dict:
    """Fresh backbone variables ``{"params": {...}}`` for inputs of width ``n_inputs``."""
    return {"params": model.init(key, jnp.zeros((1, n_inputs), jnp.float32))["params"]}


def init_head(key: jax.Array, n_features: int, n_classes: int) -> dict:
    """Fresh head variables ``{"params": {"classifier": {...}}}``."""
    head = Head(n_classes)
    return {"params": head.init(key, jnp.zeros((1, n_features), jnp.float32))["params"]}


def logits(model: Backbone, backbone: dict, head: dict, x: jax.Array) -> jax.Array:
    """Class scores of one task: its head applied to the backbone's features of ``x``."""
    n_classes = head["params"]["classifier"]["bias"].shape[0]
    return Head(n_classes).apply(head, model.apply(backbone, x))


def dense_layers(backbone: dict) -> list[str]:
    """The flat paths ("params/dense_0/kernel", …) of the backbone's Dense kernels, in order.

    The kernels are Flax layout (in, out); the paths are those ``swudi_jax.merge`` sees on
    the backbone pytree with "/" separators, i.e. the keys of a ``grams`` mapping, and those
    :func:`swudi_jax.model.calibration.task_grams` returns for ``lambda v, x: model.apply(v, x)``.
    """
    flat = traverse_util.flatten_dict(backbone, sep="/")
    paths = [p for p in flat if p.endswith("/kernel") and flat[p].ndim == 2]
    return sorted(paths, key=lambda p: int(p.split("/")[-2].rsplit("_", 1)[-1]))


__all__ = [
    "Backbone",
    "Head",
    "build_model",
    "dense_layers",
    "init_backbone",
    "init_head",
    "logits",
]
