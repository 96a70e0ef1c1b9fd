"""NumPy ``.npz`` archives: lazy per-key reads, streamed writes, exact dtypes (bf16 included).

``np.load`` already decompresses one member at a time. NumPy has no bf16/fp8 dtype of its
own, so such arrays are stored as unsigned integers of the same width and their real dtype
is recorded in a JSON member ``__dtypes__``; reading views them back, bit for bit.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from swudi_jax.checkpoint.io import confine
from swudi_jax.checkpoint.io.reader import BaseReader, CheckpointError, reading_file

DTYPES_KEY = "__dtypes__"
EXTENDED = {np.dtype(t).name: np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}


def is_npz(path: Path) -> bool:
    return path.is_file() and path.suffix == ".npz"


def _member_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    return tuple(shape), dtype


class NpzReader(BaseReader):
    """Lazy reader over an ``.npz`` archive written by ``numpy.savez`` or by ``write``."""

    format = "npz"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._file = confine.open_file(self.path, confine.model_root(self.path), "npz file")
        try:
            with reading_file(self.path, ".npz file", (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError)):
                self._npz = np.load(self._file, allow_pickle=False)  # read from the checked handle only
            members = {name.removesuffix(".npy"): name for name in self._npz.zip.namelist()}
            extended = {}
            if DTYPES_KEY in members:
                extended = json.loads(str(self._npz[DTYPES_KEY]))
            self._real: dict[str, np.dtype] = {}
            for key, member in members.items():
                if key == DTYPES_KEY:
                    continue
                shape, dtype = _member_header(self._npz.zip, member)
                if key in extended:
                    self._real[key] = EXTENDED[extended[key]]
                    dtype = self._real[key]
                elif dtype.kind == "V":
                    raise CheckpointError(f"{self.path}: tensor {key!r} has an opaque dtype {dtype} (no {DTYPES_KEY} record)")
                self._entries[key] = (shape, dtype)
        except BaseException:
            self._file.close()
            raise

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        out = {}
        for key in keys:
            self._check_key(key)
            try:
                array = self._npz[key]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({exc})") from None
            if key in self._real:
                array = array.view(self._real[key])
            out[key] = self._checked(key, array)
        return out

    def close(self) -> None:
        self._npz.close()
        self._file.close()


class NpzWriter:
    """Streams arrays into an uncompressed ``.npz``, one member at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._extended: dict[str, str] = {}

    def write(self, key: str, array: np.ndarray) -> None:
        if key == DTYPES_KEY:
            raise CheckpointError(f"{self.path}: {DTYPES_KEY!r} is a reserved name")
        array = np.asarray(array)
        if array.dtype.name in EXTENDED:
            self._extended[key] = array.dtype.name
            array = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, array, allow_pickle=False)

    def close(self) -> None:
        if self._extended:
            with self._zip.open(f"{DTYPES_KEY}.npy", "w") as f:
                np.lib.format.write_array(f, np.array(json.dumps(self._extended)), allow_pickle=False)
        self._zip.close()

    def abort(self) -> None:
        self._zip.close()


__all__ = [
    "DTYPES_KEY",
    "EXTENDED",
    "NpzReader",
    "NpzWriter",
    "is_npz",
]
