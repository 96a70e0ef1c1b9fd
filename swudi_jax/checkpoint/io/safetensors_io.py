"""Hugging Face safetensors: one file, or a sharded directory with ``model.safetensors.index.json``.

Reading is lazy: each shard is opened once and its header parsed (shapes and dtypes), and
``read_many`` reads only the tensors asked for, with positional reads from those handles (no
memory maps pile up over a long streamed merge). bf16 and fp8 (``F8_E4M3``, ``F8_E5M2``) come
back as ``ml_dtypes`` arrays.

Writing streams too: all shapes and dtypes are known before the first tensor arrives, so
every shard's header and offsets are laid out up front and each tensor is written to its
place as soon as it is ready, in any order. Output follows the Hugging Face convention:
``model.safetensors`` for one shard, else ``model-0000k-of-0000n.safetensors`` plus an index.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from swudi_jax.checkpoint.io import confine
from swudi_jax.checkpoint.io.reader import BaseReader, CheckpointError, ShapeDtype, naming_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES: dict[np.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


def is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` file, or a directory holding an index or ``.safetensors`` files."""
    if path.is_file():
        return path.suffix == ".safetensors"
    return path.is_dir() and ((path / INDEX_NAME).is_file() or any(path.glob("*.safetensors")))


def read_weight_map(index: Path, root: Path) -> dict[str, str]:
    """The ``weight_map`` of an index: tensor name -> plain shard file name (checked, nothing else opened)."""
    text = confine.read_file(index, root, "safetensors index")
    try:
        weight_map = json.loads(text)["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: `weight_map` must be a mapping of tensor name to shard file, "
                              f"got a {type(weight_map).__name__}")
    for key, name in weight_map.items():
        confine.plain_name(name, f"{index}: weight_map", key)
    return weight_map


def shard_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint path, from its index when there is one.

    Every file is checked to resolve inside the model folder (:mod:`swudi_jax.checkpoint.io.confine`)
    and to be a regular file before it is returned; index entries must be plain names.
    """
    if not path.is_dir():
        return [confine.checked_file(path, "safetensors file")]
    root = confine.model_root(path)
    index = path / INDEX_NAME
    if index.is_file() or index.is_symlink():
        names = list(dict.fromkeys(read_weight_map(index, root).values()))
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that do not exist: {missing}")
        files = [path / name for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files and no {INDEX_NAME}")
    for file in files:
        confine.confined_file(file, root, "safetensors shard")
    return files


MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def _pread(f: BinaryIO, size: int, offset: int, file: Path) -> bytearray:
    """Exactly ``size`` bytes at ``offset`` of an open file (positional: safe across threads)."""
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:
        got = os.preadv(f.fileno(), [view[done:]], offset + done)
        if got == 0:
            raise CheckpointError(f"{file}: unreadable or truncated safetensors file (ends at byte {offset + done}, "
                                  f"{size - done} more expected)")
        done += got
    return buffer


def _entry(file: Path, key: str, info: object, data_size: int) -> tuple[ShapeDtype, int]:
    """One header entry checked: ((shape, dtype), offset in the data section)."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: tensor {key!r}: header entry is a {type(info).__name__}, not a mapping")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in DTYPES:
        raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {code}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{file}: tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size):
        raise CheckpointError(f"{file}: tensor {key!r}: data_offsets {offsets!r} do not lie within the file's "
                              f"{data_size} data bytes (truncated?)")
    size = math.prod(shape) * DTYPES[code].itemsize
    if offsets[1] - offsets[0] != size:
        raise CheckpointError(f"{file}: tensor {key!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                              f"but {code}{shape} needs {size}")
    return (tuple(shape), DTYPES[code]), offsets[0]


def read_header(f: BinaryIO, file: Path) -> tuple[dict[str, tuple[ShapeDtype, int]], dict[str, str]]:
    """The header of an open safetensors file: ``{key: ((shape, dtype), absolute offset)}``
    (keys sorted, as the safetensors library lists them) and the ``__metadata__`` string map.

    Layout: an 8-byte little-endian header length n, n bytes of JSON, then the data section,
    which every entry's ``data_offsets`` index (checked to lie inside the file and to hold
    exactly prod(shape) × itemsize bytes).
    """
    size = os.fstat(f.fileno()).st_size
    (n,) = struct.unpack("<Q", bytes(_pread(f, 8, 0, file)))
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file (header of {n} bytes in a file "
                              f"of {size})")
    try:
        header = json.loads(bytes(_pread(f, n, 8, file)))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: unreadable safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: `__metadata__` must map strings to strings")
    entries = {}
    for key in sorted(header):
        (shape_dtype, offset) = _entry(file, key, header[key], size - 8 - n)
        entries[key] = (shape_dtype, 8 + n + offset)
    return entries, metadata


class SafetensorsReader(BaseReader):
    """Lazy reader over a safetensors file or sharded directory.

    Each shard is opened once, through :func:`swudi_jax.checkpoint.io.confine.open_file` (the
    opened file itself is checked to lie inside the model folder), its header parsed from that
    handle, and every tensor later read from the same handle with positional reads: replacing a
    shard by a link after the check changes nothing read. ``close()`` closes the handles.
    """

    format = "safetensors"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._where: dict[str, tuple[Path, int]] = {}
        self._handles: dict[Path, BinaryIO] = {}
        self.metadata: dict[str, str] = {}
        try:
            root = confine.model_root(self.path)
            for file in shard_files(self.path):
                f = self._handles[file] = confine.open_file(file, root, "safetensors shard")
                entries, metadata = read_header(f, file)
                self.metadata.update(metadata)
                for key, (shape_dtype, offset) in entries.items():
                    if key in self._where:
                        raise CheckpointError(f"{file}: tensor {key!r} also appears in {self._where[key][0]}")
                    self._entries[key] = shape_dtype
                    self._where[key] = (file, offset)
            self._check_index()
        except BaseException:
            self.close()
            raise

    def _check_index(self) -> None:
        index = self.path / INDEX_NAME
        if not self.path.is_dir() or not index.is_file():
            return
        weight_map = read_weight_map(index, confine.model_root(self.path))
        for key, name in weight_map.items():
            if key not in self._where or self._where[key][0] != self.path / name:
                raise CheckpointError(f"{index}: tensor {key!r} is listed in {name} but not found there")

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for key in keys:
            self._check_key(key)
            (shape, dtype), (file, offset) = self._entries[key], self._where[key]
            try:
                raw = _pread(self._handles[file], math.prod(shape) * dtype.itemsize, offset, file)
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot read tensor {key!r} ({exc.strerror or exc})") from None
            out[key] = self._checked(key, np.frombuffer(raw, dtype=dtype).reshape(shape))
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}


def _header(entries: Mapping[str, ShapeDtype], metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The padded JSON header of one shard and each tensor's data offset."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets, position = {}, 0
    for key, (shape, dtype) in entries.items():
        if np.dtype(dtype) not in CODES:
            raise CheckpointError(f"tensor {key!r}: dtype {dtype} cannot be stored in safetensors")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [position, position + size]}
        offsets[key] = position
        position += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, offsets


def plan_shards(entries: Mapping[str, ShapeDtype], shard_size: int | None) -> list[dict[str, ShapeDtype]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a larger tensor gets its own)."""
    shards: list[dict[str, ShapeDtype]] = [{}]
    used = 0
    for key, (shape, dtype) in entries.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shard_size is not None and shards[-1] and used + size > shard_size:
            shards.append({})
            used = 0
        shards[-1][key] = (tuple(shape), np.dtype(dtype))
        used += size
    return shards


class SafetensorsWriter:
    """Streams tensors into pre-laid-out safetensors shards; ``close()`` checks all were written.

    Args:
      path: a directory (HF layout, sharded with an index when needed) or a ``.safetensors`` file.
      entries: every tensor's (shape, dtype), in the order they should appear.
      shard_size: maximum bytes per shard (None: one file).
      metadata: the ``__metadata__`` string map (``{"format": "pt"}`` by default, as HF expects).
      keys: the tensors this writer writes when several writers (processes) fill one layout
        (default: all); ``close()`` checks these.
      create: lay the shards out (headers written, files sized) and write the index at ``close()``;
        False opens the shards another writer with the same arguments laid out, to fill ``keys``.
    """

    def __init__(self, path: str | os.PathLike, entries: Mapping[str, ShapeDtype], *,
                 shard_size: int | None = None, metadata: Mapping[str, str] | None = None,
                 keys: Iterable[str] | None = None, create: bool = True):
        self.path = Path(path)
        metadata = {"format": "pt"} if metadata is None else metadata
        single_file = self.path.suffix == ".safetensors"
        shards = plan_shards(entries, None if single_file else shard_size)
        if single_file:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            names = [self.path]
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            n = len(shards)
            names = [self.path / (SINGLE_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors") for k in range(n)]
        self._where: dict[str, tuple[object, int, ShapeDtype]] = {}
        self._files = []
        self._weight_map: dict[str, str] = {}
        self._total = 0
        for name, shard in zip(names, shards):
            raw, offsets = _header(shard, metadata)
            data_start = 8 + len(raw)
            size = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in shard.values())
            with naming_file(name):
                f = open(name, "wb" if create else "r+b")
                self._files.append(f)
                if create:
                    f.write(struct.pack("<Q", len(raw)) + raw)
                    f.truncate(data_start + size)
            self._total += size
            for key, entry in shard.items():
                self._where[key] = (f, data_start + offsets[key], entry)
                self._weight_map[key] = name.name
        self._index = None if single_file or len(shards) == 1 or not create else self.path / INDEX_NAME
        self._pending = set(self._where) if keys is None else set(keys)

    def write(self, key: str, array: np.ndarray) -> None:
        if key not in self._where:
            raise CheckpointError(f"{self.path}: tensor {key!r} was not planned for this checkpoint")
        f, offset, (shape, dtype) = self._where[key]
        array = np.asarray(array)
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise CheckpointError(f"{self.path}: tensor {key!r} is {array.dtype}{list(array.shape)}, planned {dtype}{list(shape)}")
        self._put(f, offset, array)
        self._pending.discard(key)

    def write_slice(self, key: str, start: int, array: np.ndarray) -> None:
        """Write ``array`` (C order) as the tensor's flat elements ``start``, ``start + 1``, ...: a
        block of rows that the writer of another process does not write (not counted by ``close()``)."""
        if key not in self._where:
            raise CheckpointError(f"{self.path}: tensor {key!r} was not planned for this checkpoint")
        f, offset, (shape, dtype) = self._where[key]
        array = np.asarray(array)
        if array.dtype != dtype or start < 0 or start + array.size > int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{self.path}: elements {start}..{start + array.size} of tensor {key!r} "
                                  f"({dtype}{list(shape)}) given as {array.dtype}")
        self._put(f, offset + start * dtype.itemsize, array)

    @staticmethod
    def _put(f, offset: int, array: np.ndarray) -> None:
        with naming_file(f.name):
            f.seek(offset)
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())

    def close(self) -> None:
        """Flush and close every shard and write the index; raise if a tensor was never written."""
        for f in self._files:
            with naming_file(f.name):
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._files = []
        if self._pending:
            raise CheckpointError(f"{self.path}: {len(self._pending)} tensor(s) never written, e.g. {sorted(self._pending)[:3]}")
        if self._index is not None:
            index = {"metadata": {"total_size": self._total}, "weight_map": self._weight_map}
            with naming_file(self._index):
                self._index.write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for f in self._files:
            try:
                f.close()
            except OSError:  # a full disk can fail the final flush too; the files are removed anyway
                pass
        self._files = []


__all__ = [
    "CODES",
    "DTYPES",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "SINGLE_NAME",
    "SafetensorsReader",
    "SafetensorsWriter",
    "is_safetensors",
    "plan_shards",
    "read_header",
    "read_weight_map",
    "shard_files",
]
