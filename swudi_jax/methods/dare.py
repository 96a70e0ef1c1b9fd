"""DARE: drop and rescale the task vectors, then merge them.

Source: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch" (ICML 2024, arXiv 2311.03099). Each entry of each τi is dropped
with probability p and the survivors are rescaled by 1/(1 − p), which keeps the expected
value: E[τ̃i] = τi. Then

- ``then="task_arithmetic"``: τm = Σi τ̃i, θ = θ0 + λ τm (default λ = 0.3, as task arithmetic);
- ``then="ties"``: TIES's sign election and disjoint mean on τ̃ (the random drop replaces
  TIES's magnitude trim, as mergekit's ``dare_ties`` does), default λ = 1.

p = 0.9 is the drop rate the paper uses for its main merges of fine-tuned LLMs. The masks
are a deterministic function of the PRNG key: ``merge`` derives one key per leaf by
folding a stable hash (CRC-32) of the parameter path, and the layer index of a scanned
stack, into ``jax.random.PRNGKey(seed)``; a linear weight's mask is drawn in maths layout
(outputs, inputs).
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from swudi_jax.methods.task_arithmetic import DEFAULT_LAMBDA
from swudi_jax.methods.ties import disjoint_merge
from swudi_jax.methods.spec import MethodSpec
from swudi_jax.maths.validation import check_choice, check_number

THEN = ("task_arithmetic", "ties")
DEFAULT_DROP = 0.9


def leaf_key(seed: int, path: str, layer: int = 0) -> jax.Array:
    """The PRNG key of one parameter (and one layer of a scanned stack): a raw uint32[2] key."""
    path_hash = zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), path_hash), layer)


def drop_and_rescale(tau: jax.Array, key: jax.Array, drop: float, rescale: bool = True) -> jax.Array:
    """τ̃ = τ · m / (1 − p) with m ~ Bernoulli(1 − p) entry-wise (no division if not rescale)."""
    keep = jax.random.bernoulli(key, 1.0 - drop, tau.shape)
    kept = jnp.where(keep, tau, jnp.zeros_like(tau))
    return kept / (1.0 - drop) if rescale else kept


def dare(
    tau: jax.Array,
    *,
    drop: float = DEFAULT_DROP,
    rescale: bool = True,
    seed: int = 0,
    then: str = "task_arithmetic",
    key: jax.Array | None = None,
) -> jax.Array:
    """DARE on one tensor's task vectors.

    Args:
      tau: task vectors (N, ...) of any shape.
      drop: the drop probability p ∈ [0, 1).
      rescale: divide the survivors by 1 − p (True in the paper).
      seed: builds the key ``jax.random.PRNGKey(seed)`` when no ``key`` is given.
      then: "task_arithmetic" (τm = Σ τ̃i) or "ties" (sign election, disjoint mean).
      key: a raw PRNG key (``merge`` passes one per leaf).
    Returns:
      The merged task vector τm, shape (...), in ``tau``'s dtype (apply λ as the scale).
    """
    kept = dropped(tau, drop=drop, rescale=rescale, seed=seed, then=then, key=key)
    if then == "ties":
        return disjoint_merge(kept)
    return jnp.sum(kept, axis=0)


def dropped(tau: jax.Array, *, drop: float = DEFAULT_DROP, rescale: bool = True, seed: int = 0,
            then: str = "task_arithmetic", key: jax.Array | None = None) -> jax.Array:
    """DARE's drop-and-rescale step τ̃ (N, ...) in ``tau``'s dtype (arguments as :func:`dare`)."""
    key = jax.random.PRNGKey(seed) if key is None else key
    return drop_and_rescale(tau, key, drop, rescale).astype(tau.dtype)


def _validate(options: Mapping[str, Any]) -> None:
    check_number(options["drop"], "drop", low=0.0, high=1.0)
    if options["drop"] >= 1.0:
        raise ValueError(f"drop must be < 1 (1 would drop every entry), got {options['drop']!r}")
    if not isinstance(options["rescale"], bool):
        raise ValueError(f"rescale must be true or false, got {options['rescale']!r}")
    check_number(options["seed"], "seed", low=0, integer=True)
    check_choice(options["then"], "then", THEN)


def _leaf_keys(options: Mapping[str, Any], path: str, layer: int, shape: tuple[int, ...] = ()) -> dict[str, jax.Array]:
    return {"key": leaf_key(int(options["seed"]), path, layer)}


DARE = MethodSpec(
    name="dare",
    fn=dare,
    kind="elementwise",
    inputs=("key",),
    default_scale=lambda options: DEFAULT_LAMBDA if options["then"] == "task_arithmetic" else 1.0,
    source="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    validate=_validate,
    leaf_inputs=_leaf_keys,
    kept=dropped,
)


__all__ = [
    "DARE",
    "DEFAULT_DROP",
    "THEN",
    "dare",
    "drop_and_rescale",
    "leaf_key",
]
