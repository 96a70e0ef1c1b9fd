"""The small protocol every checkpoint reader follows, and the errors readers raise.

A reader is a flat view of one checkpoint: ``keys()`` in file order, ``shape_dtype(key)``
from the header or metadata alone, and ``read(key)`` / ``read_many(keys)`` that load only the
tensors asked for (where the format allows it), as NumPy arrays with their stored dtype
(``ml_dtypes.bfloat16`` for bf16).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

ShapeDtype = tuple[tuple[int, ...], np.dtype]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and the key."""


@runtime_checkable
class CheckpointReader(Protocol):
    path: Path
    format: str

    def keys(self) -> list[str]: ...

    def shape_dtype(self, key: str) -> ShapeDtype: ...

    def read(self, key: str) -> np.ndarray: ...

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class BaseReader:
    """Shared behaviour: context management, key checks and a per-key ``read_many``."""

    format = "?"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, ShapeDtype] = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape_dtype(self, key: str) -> ShapeDtype:
        self._check_key(key)
        return self._entries[key]

    def read(self, key: str) -> np.ndarray:
        return self.read_many([key])[key]

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        return {key: self.read(key) for key in keys}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self._entries)} tensors)"

    def _check_key(self, key: str) -> None:
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {key!r} ({len(self._entries)} tensors in the checkpoint)")

    def _checked(self, key: str, array: np.ndarray) -> np.ndarray:
        """The array as read, after checking it against the header (a short read is an error)."""
        shape, dtype = self._entries[key]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} read as {array.dtype}{list(array.shape)}, "
                f"but the header says {dtype}{list(shape)}"
            )
        return array


@contextlib.contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError that names no file (ENOSPC, EFBIG from ``write``) with ``path`` as its file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise type(exc)(exc.errno, f"{exc.strerror or exc} while writing", str(path)) from None


@contextlib.contextmanager
def reading_file(path: str | os.PathLike, what: str,
                 errors: tuple[type[Exception], ...] = (Exception,)) -> Iterator[None]:
    """Re-raise a parser's error (one of ``errors``) as ``CheckpointError`` naming ``path``:
    "unreadable or truncated {what} ({type}: {message})"; a CheckpointError passes as raised."""
    try:
        yield
    except CheckpointError:
        raise
    except errors as exc:
        raise CheckpointError(f"{path}: unreadable or truncated {what} ({type(exc).__name__}: {exc})") from None


def write_all(writer, arrays: Mapping[str, np.ndarray]) -> None:
    """Feed every array to a streaming writer, then close it; on any failure abort it
    (its partial output removed) and re-raise."""
    try:
        for key, array in arrays.items():
            writer.write(key, array)
    except BaseException:
        writer.abort()
        raise
    writer.close()


__all__ = [
    "BaseReader",
    "CheckpointError",
    "CheckpointReader",
    "ShapeDtype",
    "naming_file",
    "reading_file",
    "write_all",
]
