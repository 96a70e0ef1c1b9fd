"""Orbax checkpoints, viewed flat with "/" paths, restored lazily group by group.

Shapes and dtypes come from the checkpoint's metadata alone. ``read_many`` restores only the
requested leaves, by handing orbax an abstract target that holds just those paths
(``partial_restore``) with ``restore_type=np.ndarray``, so nothing is placed on a device.
Writing uses ``orbax.checkpoint.StandardCheckpointer`` on the nested dict.

Typed PRNG keys (an NNX model's ``rngs``): orbax saves a ``jax.random`` key as its uint32 key
data with the key's implementation beside it. The reader gives the key data, as every other
format's reader would; :meth:`OrbaxReader.key_impls` finds which leaves were keys (restoring the
small uint32 leaves as JAX arrays, which orbax returns typed), and :class:`OrbaxWriter` saves
those leaves as keys again.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from swudi_jax.checkpoint.io import confine, orbax_layout
from swudi_jax.checkpoint.io.reader import BaseReader, CheckpointError, reading_file
from swudi_jax.model.flat import flatten, nest

SEP = "/"


def is_orbax(path: Path) -> bool:
    return orbax_layout.kind(path) is not None


def _ocp():
    """orbax.checkpoint, imported on first use (it is slow to import and only this format needs it)."""
    import orbax.checkpoint as ocp

    return ocp


def _tree_metadata(path: Path):
    with _ocp().PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    return getattr(metadata, "tree", metadata)


def _has_sequence(tree) -> bool:
    if isinstance(tree, (list, tuple)):
        return True
    return isinstance(tree, Mapping) and any(_has_sequence(v) for v in tree.values())


class OrbaxReader(BaseReader):
    """Lazy reader over an orbax PyTree checkpoint of nested dicts."""

    format = "orbax"

    def __init__(self, path: str | os.PathLike, *, step: int | None = None, item: str | None = None):
        super().__init__(path)
        self._dir = orbax_layout.locate(self.path, step=step, item=item)
        confine.check_tree(self.path)  # orbax opens the files itself: every link must stay inside
        with reading_file(self.path, "orbax checkpoint"):  # orbax/tensorstore raise many types: any Exception
            tree = _tree_metadata(self._dir.absolute())
        if not isinstance(tree, Mapping) or not tree:
            raise CheckpointError(f"{self.path}: unreadable or truncated orbax checkpoint (no readable tree metadata)")
        if _has_sequence(tree):
            raise CheckpointError(f"{self.path}: only orbax checkpoints of nested dicts are supported (found a list)")
        flat = flatten(tree)[0]
        for key, leaf in flat.items():
            shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
            if shape is None or dtype is None:
                raise CheckpointError(f"{self.path}: leaf {key!r} has no array metadata ({type(leaf).__name__})")
            self._entries[key] = (tuple(int(s) for s in shape), np.dtype(dtype))

    def key_impls(self) -> dict[str, Any]:
        """{key: PRNG implementation} of the leaves orbax saved as typed ``jax.random`` keys: of
        the uint32 leaves shaped like key data (last axis 2 or 4, at most 65,536 elements), those
        that orbax restores typed."""
        shapes = {k: s for k, (s, d) in self._entries.items()
                  if d == np.uint32 and s and s[-1] in (2, 4) and math.prod(s) <= 1 << 16}
        if not shapes:
            return {}
        target = nest({k: jax.ShapeDtypeStruct(s, np.uint32) for k, s in shapes.items()}, SEP)
        ocp, one = _ocp(), jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # tiny leaves: any device
        restored = self._restore(list(shapes), target, jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one), target))
        return {k: jax.random.key_impl(x) for k, x in flatten(restored)[0].items()
                if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)}

    def _restore(self, keys: list[str], target, restore_args):
        """orbax's partial restore of ``target`` (naming the first ``keys`` if it fails)."""
        ocp = _ocp()
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                return checkpointer.restore(
                    self._dir.absolute(),
                    args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
                )
        except Exception as exc:  # noqa: BLE001 - orbax/tensorstore raise many types
            raise CheckpointError(
                f"{self.path}: cannot restore {keys[:3]}... (unreadable or truncated orbax checkpoint: {type(exc).__name__}: {exc})"
            ) from None

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(keys)
        for key in keys:
            self._check_key(key)
        if not keys:
            return {}
        target = nest({k: jax.ShapeDtypeStruct(*self._entries[k]) for k in keys}, SEP)
        ocp = _ocp()
        restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
        flat = flatten(self._restore(keys, target, restore_args))[0]
        return {key: self._checked(key, np.asarray(flat[key])) for key in keys}


class OrbaxWriter:
    """Collects arrays, then saves them as one orbax checkpoint on ``close()`` (orbax saves whole
    trees); the leaves named in ``key_impls`` (:meth:`OrbaxReader.key_impls`) as typed PRNG keys."""

    def __init__(self, path: str | os.PathLike, key_impls: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self._flat: dict[str, Any] = {}
        self._key_impls = dict(key_impls or {})

    def write(self, key: str, array: np.ndarray) -> None:
        if key not in self._key_impls:
            self._flat[key] = np.asarray(array)
            return
        try:
            self._flat[key] = jax.random.wrap_key_data(np.asarray(array), impl=self._key_impls[key])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: {key!r} was a PRNG key in the base and cannot be saved as one "
                                  f"({np.asarray(array).dtype}{list(np.shape(array))}: {exc})") from None

    def close(self) -> None:
        """Save the tree at ``path``: a new folder, or an existing one that the checkpoint's files
        join (saved in a fresh sub-folder, then moved up), so that
        ``StandardCheckpointer().restore(path)`` works at ``path`` itself."""
        logging.getLogger("absl").setLevel(logging.WARNING)
        tree = nest(self._flat, SEP)
        if not self.path.is_dir():
            if self.path.exists() or self.path.is_symlink():
                raise CheckpointError(f"{self.path}: orbax output exists and is not a folder")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _ocp().StandardCheckpointer() as checkpointer:
                checkpointer.save(self.path.absolute(), tree)
        else:
            staging = self.path / ".orbax-save"
            with _ocp().StandardCheckpointer() as checkpointer:
                checkpointer.save(staging.absolute(), tree)
            for entry in sorted(staging.iterdir()):
                if (self.path / entry.name).exists():
                    raise CheckpointError(f"{self.path}: orbax output file {entry.name} is already there")
                os.replace(entry, self.path / entry.name)
            staging.rmdir()
        self._flat = {}

    def abort(self) -> None:
        self._flat = {}


__all__ = [
    "SEP",
    "OrbaxReader",
    "OrbaxWriter",
    "is_orbax",
]
