"""Flax msgpack checkpoints (``flax.serialization.msgpack_serialize``), viewed flat with "/" paths.

msgpack cannot be read piecewise: the reader loads the whole file once on open, so merging
msgpack inputs holds every model in memory (use safetensors, npz or orbax to stream).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from flax import serialization

from swudi_jax.checkpoint.io import confine
from swudi_jax.checkpoint.io.reader import BaseReader, CheckpointError, reading_file
from swudi_jax.model.flat import flatten, nest

SEP = "/"


def is_msgpack(path: Path) -> bool:
    return path.is_file() and path.suffix == ".msgpack"


class MsgpackReader(BaseReader):
    """Reader over a flax msgpack file (loaded eagerly, see the module note)."""

    format = "msgpack"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        data = confine.read_file(self.path, confine.model_root(self.path), "msgpack file")
        with reading_file(self.path, "msgpack file"):  # msgpack raises many types: any Exception
            tree = serialization.msgpack_restore(data)
        self._arrays = {}
        for key, leaf in flatten(tree)[0].items():
            if not isinstance(leaf, (np.ndarray, np.generic)):
                raise CheckpointError(f"{self.path}: leaf {key!r} is a {type(leaf).__name__}, not an array")
            self._arrays[key] = np.asarray(leaf)
            self._entries[key] = (tuple(self._arrays[key].shape), self._arrays[key].dtype)

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        out = {}
        for key in keys:
            self._check_key(key)
            out[key] = self._arrays[key]
        return out

    def close(self) -> None:
        self._arrays = {}


def write(path: str | os.PathLike, flat: Mapping[str, np.ndarray]) -> Path:
    """Write a flat ``{path: array}`` map as a nested flax msgpack file (in place; see ``io.save``)."""
    tree = nest({key: np.asarray(value) for key, value in flat.items()}, SEP)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.msgpack_serialize(tree))
    return path


__all__ = [
    "SEP",
    "MsgpackReader",
    "is_msgpack",
    "write",
]
