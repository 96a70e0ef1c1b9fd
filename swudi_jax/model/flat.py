"""Flat path views of models and the one compatibility check between them.

Every per-leaf decision works on a flat ``{path: leaf}`` view (in the spirit of
``flax.traverse_util.flatten_dict``): dict keys, sequence indices and attribute names joined
by "/"; a flat dict's keys such as ``blocks.0.attn.weight`` are paths as they are. Models are
compared through their signatures ``{path: (shape, dtype)}``, so the same check serves
pytrees in memory and checkpoints on disk (where only headers are read).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

Signature = Mapping[str, tuple[tuple[int, ...], Any]]
"""``{path: (shape, dtype)}`` of a model."""


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten(tree: Any, name: str = "params") -> tuple[dict[str, Any], Any]:
    """The flat path → leaf view of a pytree and its treedef (paths joined by "/").

    Raises:
      ValueError: two leaves would share one flat path.
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for keys, leaf in with_paths:
        path = "/".join(_key_name(k) for k in keys)
        if path in flat:
            raise ValueError(f"{name}: two leaves share the flat path {path!r}")
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = np.asarray(leaf)
        flat[path] = leaf
    return flat, treedef


def unflatten(treedef: Any, flat: Mapping[str, Any], paths: Iterable[str]) -> Any:
    """The pytree of ``treedef`` with leaves ``flat[path]`` in the order of ``paths``."""
    return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])


def nest(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """Nested dicts from a flat ``{path: leaf}`` map (the inverse of :func:`flatten` for dicts).

    Raises:
      ValueError: a path runs through a leaf.
    """
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} runs through a leaf at {part!r}")
        node[last] = leaf
    return tree


def signature(flat: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{path: (shape, dtype)}`` of a flat view."""
    return {path: (tuple(int(s) for s in leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat.items()}


def _listing(paths: Iterable[str], limit: int = 6) -> str:
    paths = sorted(paths)
    more = f" … and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(repr(p) for p in paths[:limit]) + more


class Mismatch(NamedTuple):
    """How a model differs from the base: ``kind`` "paths" (with ``missing`` and ``extra``),
    "shape" or "dtype" (at ``path``, ``got`` against the base's ``want``)."""

    kind: str
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    path: str = ""
    got: Any = None
    want: Any = None


def mismatch(base: Signature, other: Signature, *, dtypes: bool = True) -> Mismatch | None:
    """The first difference of ``other`` from ``base`` (paths, then shapes, then dtypes), or None."""
    missing, extra = set(base) - set(other), set(other) - set(base)
    if missing or extra:
        return Mismatch("paths", missing=tuple(sorted(missing)), extra=tuple(sorted(extra)))
    for path, (shape, dtype) in base.items():
        got_shape, got_dtype = other[path]
        if tuple(got_shape) != tuple(shape):
            return Mismatch("shape", path=path, got=tuple(got_shape), want=tuple(shape))
        if dtypes and np.dtype(got_dtype) != np.dtype(dtype):
            return Mismatch("dtype", path=path, got=np.dtype(got_dtype), want=np.dtype(dtype))
    return None


def check_compatible(base: Signature, experts: Sequence[Signature], names: Sequence[str],
                     base_name: str = "the base", *, dtypes: bool = True) -> None:
    """Same paths, shapes (and dtypes) in every model, as :func:`mismatch` finds them.

    Raises:
      ValueError naming the expert, the parameter path and what differs.
    """
    for who, other in zip(names, experts):
        found = mismatch(base, other, dtypes=dtypes)
        if found is None:
            continue
        if found.kind == "paths":
            parts = [f"missing {_listing(found.missing)}" if found.missing else "",
                     f"extra {_listing(found.extra)}" if found.extra else ""]
            raise ValueError(f"{who}: parameter paths differ from {base_name}: {'; '.join(p for p in parts if p)}")
        raise ValueError(f"{who}: {found.path!r} has {found.kind} {found.got}, {base_name} has {found.want}")


__all__ = ["Mismatch", "Signature", "check_compatible", "mismatch", "flatten", "nest", "signature", "unflatten"]
