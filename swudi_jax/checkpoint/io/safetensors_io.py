"""Hugging Face safetensors: one file, or a sharded directory with ``model.safetensors.index.json``.

Reading is lazy: headers are parsed once (shapes and dtypes), and each ``read_many`` call
opens only the shards it needs and reads only the tensors asked for, then closes them, so
memory maps do not pile up over a long streamed merge. bf16 and fp8 come back as
``ml_dtypes`` arrays.

Writing streams too: all shapes and dtypes are known before the first tensor arrives, so
every shard's header and offsets are laid out up front and each tensor is written to its
place as soon as it is ready, in any order. Output follows the Hugging Face convention:
``model.safetensors`` for one shard, else ``model-0000k-of-0000n.safetensors`` plus an index.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

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
    confine.confined_file(index, root, "safetensors index")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
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


class SafetensorsReader(BaseReader):
    """Lazy reader over a safetensors file or sharded directory."""

    format = "safetensors"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._file_of: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        for file in shard_files(self.path):
            try:
                with safe_open(str(file), framework="numpy") as f:
                    self.metadata.update(f.metadata() or {})
                    for key in f.keys():
                        if key in self._file_of:
                            raise CheckpointError(f"{file}: tensor {key!r} also appears in {self._file_of[key]}")
                        view = f.get_slice(key)
                        code = view.get_dtype()
                        if code not in DTYPES:
                            raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {code}")
                        self._entries[key] = (tuple(int(s) for s in view.get_shape()), DTYPES[code])
                        self._file_of[key] = file
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({exc})") from None
        self._check_index()

    def _check_index(self) -> None:
        index = self.path / INDEX_NAME
        if not self.path.is_dir() or not index.is_file():
            return
        weight_map = read_weight_map(index, confine.model_root(self.path))
        for key, name in weight_map.items():
            if self._file_of.get(key) != self.path / name:
                raise CheckpointError(f"{index}: tensor {key!r} is listed in {name} but not found there")

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            self._check_key(key)
            by_file.setdefault(self._file_of[key], []).append(key)
        out: dict[str, np.ndarray] = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="numpy") as f:
                    for key in names:
                        out[key] = self._checked(key, f.get_tensor(key))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{file}: cannot read tensors {names[:3]}... ({exc})") from None
        return out


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
    """

    def __init__(self, path: str | os.PathLike, entries: Mapping[str, ShapeDtype], *,
                 shard_size: int | None = None, metadata: Mapping[str, str] | None = None):
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
            f = open(name, "wb")
            self._files.append(f)
            data_start = 8 + len(raw)
            size = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in shard.values())
            with naming_file(name):
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(data_start + size)
            self._total += size
            for key, entry in shard.items():
                self._where[key] = (f, data_start + offsets[key], entry)
                self._weight_map[key] = name.name
        self._index = None if single_file or len(shards) == 1 else self.path / INDEX_NAME
        self._pending = set(self._where)

    def write(self, key: str, array: np.ndarray) -> None:
        if key not in self._where:
            raise CheckpointError(f"{self.path}: tensor {key!r} was not planned for this checkpoint")
        f, offset, (shape, dtype) = self._where[key]
        array = np.asarray(array)
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise CheckpointError(f"{self.path}: tensor {key!r} is {array.dtype}{list(array.shape)}, planned {dtype}{list(shape)}")
        with naming_file(f.name):
            f.seek(offset)
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        self._pending.discard(key)

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

