"""Checkpoint readers and writers, one module per format, behind one small interface.

``open_checkpoint(path)`` detects the format and returns a lazy reader (``keys()``,
``shape_dtype(key)``, ``read(key)``, ``read_many(keys)``); ``open_writer`` returns a writer
(``write(key, array)``, ``close()``, ``abort()``) that streams where the format allows
(safetensors, npz) and collects otherwise (orbax, msgpack). ``save``/``load`` are the
whole-checkpoint conveniences; ``save`` is atomic. This package knows nothing of the maths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from swudi_jax.checkpoint.io import msgpack_io, npz_io, orbax_io, safetensors_io
from swudi_jax.checkpoint.io.atomic import atomic_directory, atomic_file, check_output_free
from swudi_jax.checkpoint.io.reader import BaseReader, CheckpointError, CheckpointReader, ShapeDtype, write_all

FORMATS = ("safetensors", "orbax", "msgpack", "npz")
_READERS = {
    "safetensors": safetensors_io.SafetensorsReader,
    "orbax": orbax_io.OrbaxReader,
    "msgpack": msgpack_io.MsgpackReader,
    "npz": npz_io.NpzReader,
}
_FILE_SUFFIXES = {".safetensors": "safetensors", ".msgpack": "msgpack", ".npz": "npz"}
_WEIGHTS_NAME = {"safetensors": ".", "orbax": ".", "msgpack": "model.msgpack", "npz": "model.npz"}


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format at ``path``, from its suffix or directory content."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if orbax_io.is_orbax(path):
        return "orbax"
    for name, test in (("safetensors", safetensors_io.is_safetensors), ("npz", npz_io.is_npz),
                       ("msgpack", msgpack_io.is_msgpack)):
        if test(path):
            return name
    raise CheckpointError(
        f"{path}: cannot tell the checkpoint format (expected a .safetensors file or directory, an orbax "
        f"checkpoint, step or CheckpointManager directory, a .msgpack "
        f"or a .npz file); set `format` explicitly"
    )


def check_format(fmt: str, name: str = "format") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"{name} must be one of {list(FORMATS)} or 'auto', got {fmt!r}")
    return fmt


def open_checkpoint(path: str | os.PathLike, format: str = "auto", *, step: int | None = None,
                    item: str | None = None) -> CheckpointReader:
    """A lazy reader over the checkpoint at ``path`` (format detected unless given).

    ``step`` and ``item`` choose inside orbax folders (a CheckpointManager's step, a composite
    step's item; :mod:`swudi_jax.checkpoint.io.orbax_layout`) and are refused for other formats.
    """
    fmt = detect_format(path) if format == "auto" else check_format(format)
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if fmt == "orbax":
        return orbax_io.OrbaxReader(path, step=step, item=item)
    if step is not None or item is not None:
        raise CheckpointError(f"{path}: `step`/`item` choose inside orbax checkpoints; this is a {fmt} checkpoint")
    return _READERS[fmt](path)


def weights_path(out_dir: str | os.PathLike, format: str) -> Path:
    """Where the weights of a merged checkpoint go inside an output directory."""
    return (Path(out_dir) / _WEIGHTS_NAME[check_format(format)]).resolve()


def open_writer(path: str | os.PathLike, format: str, entries: Mapping[str, ShapeDtype], *,
                shard_size: int | None = None, metadata: Mapping[str, str] | None = None,
                key_impls: Mapping[str, Any] | None = None):
    """A writer for ``entries`` (every tensor's shape and dtype, in output order) at ``path``;
    an orbax writer saves the entries in ``key_impls`` as typed PRNG keys."""
    fmt = check_format(format)
    if fmt == "safetensors":
        return safetensors_io.SafetensorsWriter(path, entries, shard_size=shard_size, metadata=metadata)
    if fmt == "npz":
        return npz_io.NpzWriter(path)
    if fmt == "msgpack":
        return _CollectingWriter(path, msgpack_io.write)
    return orbax_io.OrbaxWriter(path, key_impls)


class _CollectingWriter:
    def __init__(self, path, write_fn):
        self.path, self._write_fn, self._flat = Path(path), write_fn, {}

    def write(self, key: str, array: np.ndarray) -> None:
        self._flat[key] = np.asarray(array)

    def close(self) -> None:
        self._write_fn(self.path, self._flat)
        self._flat = {}

    def abort(self) -> None:
        self._flat = {}


def save(path: str | os.PathLike, flat: Mapping[str, np.ndarray], format: str = "auto", *,
         force: bool = False, shard_size: int | None = None) -> Path:
    """Write a flat ``{path: array}`` map atomically as a checkpoint.

    ``format="auto"`` picks by suffix: ``.safetensors``, ``.msgpack``, ``.npz`` files; anything
    else is a safetensors directory (use ``format="orbax"`` for an orbax directory). The content
    is built under a temporary name next to ``path`` and renamed into place; an existing target
    is refused unless ``force``.
    """
    path = Path(path)
    fmt = _FILE_SUFFIXES.get(path.suffix, "safetensors") if format == "auto" else check_format(format)
    arrays = {key: np.asarray(value) for key, value in flat.items()}
    if path.suffix in _FILE_SUFFIXES:
        if path.exists() and not force:
            raise ValueError(f"output {path} exists; pass force=True to replace it")
        with atomic_file(path) as tmp:
            _write_all(tmp, fmt, arrays, shard_size)
        return path
    with atomic_directory(path, force=force) as tmp:
        if fmt == "orbax":
            os.rmdir(tmp)  # orbax creates its own directory
        _write_all(tmp, fmt, arrays, shard_size)
    return path


def _write_all(target: Path, fmt: str, arrays: Mapping[str, np.ndarray], shard_size: int | None) -> None:
    writer = open_writer(target, fmt, {k: (a.shape, a.dtype) for k, a in arrays.items()}, shard_size=shard_size)
    write_all(writer, arrays)


def load(path: str | os.PathLike, format: str = "auto") -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as a flat ``{path: array}`` dict."""
    with open_checkpoint(path, format) as reader:
        return reader.read_many(reader.keys())


__all__ = [
    "FORMATS", "BaseReader", "CheckpointError", "CheckpointReader", "atomic_directory", "atomic_file",
    "check_output_free", "detect_format", "load", "open_checkpoint", "open_writer", "save",
    "weights_path",
]
