"""What every process of a distributed merge must share, as digests compared at start
(:meth:`swudi_jax.checkpoint.distributed.Team.agree`): the config and merge options, the library
versions, and the input files (each file's size and :data:`SAMPLED_BLOCKS` blocks spread over it:
two different fine-tunes of one architecture differ in every block, and reading whole checkpoints
on every host would cost as much as the merge)."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

SAMPLED_BLOCKS, BLOCK_BYTES = 16, 4096
"""An input file's fingerprint: its size and these many blocks spread over it (first and last included)."""


def _digest(*parts: Any) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode() + b"\0")
    return h.digest()


def _file_digest(path: str, h) -> None:
    size = os.path.getsize(path)
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        for k in range(SAMPLED_BLOCKS if size > SAMPLED_BLOCKS * BLOCK_BYTES else 1):
            f.seek(0 if k == 0 else (size - BLOCK_BYTES) * k // (SAMPLED_BLOCKS - 1))
            h.update(f.read(BLOCK_BYTES if k else min(size, SAMPLED_BLOCKS * BLOCK_BYTES)))


def inputs_digest(paths: Iterable[str | os.PathLike | None]) -> bytes:
    """The input files' fingerprint: for every file under each path (links followed, names
    relative to it), its size and :data:`SAMPLED_BLOCKS` blocks of its content."""
    h = hashlib.sha256()
    for root in (os.fspath(p) for p in paths if p is not None):
        files = [root] if os.path.isfile(root) else sorted(
            os.path.join(d, name) for d, _, names in os.walk(root) for name in names)
        for path in files:
            h.update(os.path.relpath(path, root).encode() + b"\0")
            _file_digest(path, h)
    return h.digest()


def fingerprint(config, options: Mapping[str, Any]) -> dict[str, bytes]:
    """What every process of one merge must share: the config and options, the versions, the inputs."""
    import swudi_jax

    inputs = [config.grams, config.tokenizer_source, *(p for s in config.sources for p in (s.path, s.adapter))] \
        if config.sources else [config.base_model, *config.models, config.grams, config.tokenizer_source]
    versions = (swudi_jax.__version__, jax.__version__, getattr(jax.lib, "__version__", ""), np.__version__,
                platform.python_version(), sys.byteorder)
    return {"config and options": _digest(config.to_yaml(), sorted(options.items())),
            "versions (swudi_jax, jax, jaxlib, numpy, python)": _digest(*versions),
            "input files": inputs_digest(inputs)}


__all__ = ["BLOCK_BYTES", "SAMPLED_BLOCKS", "fingerprint", "inputs_digest"]
