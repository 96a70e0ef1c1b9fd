"""The model folder's non-weight files (config, tokenizer, sentence-transformers modules), copied safely.

Only an allow-list of known names is copied (:data:`SIDE_FILES`), plus the sub-folders that
a sentence-transformers ``modules.json`` lists (``1_Pooling/``, ``2_Normalize/``,
``2_Dense/``, ...; not a ``Transformer`` module's folder, whose weights are what is merged:
the base's copy would shadow the merged weights). ``README.md`` is never copied (the merge writes its own model card).
Each file must be a regular file that resolves inside the source folder's confinement root
(:mod:`swudi_jax.checkpoint.io.confine`, Hugging Face cache blobs included): a ``config.json`` that is
a link to ``~/.ssh/id_rsa`` is refused, naming it, before any compute.

Copies read the resolved file (opened with ``O_NOFOLLOW``, non-blocking, checked regular
again after opening) and write a new file with the default permissions (0644 under umask
022): no link, mode or owner is carried over.

:func:`plan_side_files` checks a source folder and lists what would be copied;
:func:`copy_side_files` copies that list (re-checking each file) into an output folder.
Both take any source folder, so a tokenizer can come from another model than the base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from swudi_jax.checkpoint.io import confine
from swudi_jax.checkpoint.io.reader import CheckpointError, naming_file

SIDE_FILES = (
    "config.json", "generation_config.json",
    # tokenizers (fast, slow, sentencepiece, BPE) and their special tokens
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    # sentence-transformers
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
)
MODULES_NAME = "modules.json"
MAX_DEPTH = 4
MAX_FILE_BYTES = 2 * 1024**3  # a tokenizer or module config; a bigger "side file" is refused


@dataclass(frozen=True)
class SideFile:
    """One file to copy: where it is (as found), and its path relative to the output folder."""

    source: Path
    relative: str
    folder: bool = False  # a module folder, created even when empty (sentence-transformers' Normalize)


def _module_folders(folder: Path, root: Path) -> list[str]:
    """The sub-folders a sentence-transformers ``modules.json`` names (plain relative paths)."""
    modules = folder / MODULES_NAME
    if not (modules.exists() or modules.is_symlink()):
        return []
    text = confine.read_file(modules, root, "side file")
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{modules}: not a valid sentence-transformers modules.json ({exc})") from None
    if not isinstance(entries, list):
        raise CheckpointError(f"{modules}: expected a list of modules, got a {type(entries).__name__}")
    folders = []
    for i, entry in enumerate(entries):
        sub = entry.get("path", "") if isinstance(entry, dict) else None
        if not isinstance(sub, str):
            raise CheckpointError(f"{modules}: module {i} has no string `path` ({entry!r})")
        if sub in ("", "."):
            continue  # the transformer module lives in the folder itself
        if str(entry.get("type", "")).endswith("models.Transformer"):
            continue  # its weights are the ones merged: a copy of the base's would shadow the merge
        parts = Path(sub).parts
        if Path(sub).is_absolute() or not parts or any(p in (".", "..") for p in parts) or "\\" in sub:
            raise CheckpointError(f"{modules}: module {i} names the path {sub!r}, which is not a folder inside "
                                  "the model folder; refusing it")
        folders.append(sub)
    return folders


def _walk(folder: Path, relative: str, root: Path, depth: int, out: list[SideFile]) -> None:
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{folder}: sub-folders nested deeper than {MAX_DEPTH} levels; refusing to copy them")
    real = confine.confined_dir(folder, root, "side folder")
    out.append(SideFile(folder, relative, folder=True))
    for entry in sorted(os.scandir(real), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        path, rel = folder / entry.name, f"{relative}/{entry.name}"
        if entry.is_dir(follow_symlinks=True) and Path(os.path.realpath(path)).is_relative_to(root):
            _walk(path, rel, root, depth + 1, out)
        else:
            confine.confined_file(path, root, "side file")
            out.append(SideFile(path, rel))


def plan_side_files(source: str | os.PathLike) -> list[SideFile]:
    """The side files of a model folder, each checked; nothing is opened but ``modules.json``.

    Args:
      source: a model folder (a single-file checkpoint has no side files: empty list).
    Raises:
      CheckpointError naming a listed file that is a link out of the folder, not a regular
      file, or a malformed ``modules.json``.
    """
    folder = Path(source)
    if not folder.is_dir():
        return []
    root = confine.model_root(folder)
    files = []
    for name in SIDE_FILES:
        path = folder / name
        if path.exists() or path.is_symlink():
            confine.confined_file(path, root, "side file")
            files.append(SideFile(path, name))
    for sub in _module_folders(folder, root):
        if (folder / sub).exists() or (folder / sub).is_symlink():
            _walk(folder / sub, sub, root, 1, files)
    return files


def _copy_one(item: SideFile, root: Path, out: Path) -> None:
    if item.folder:
        confine.confined_dir(item.source, root, "side folder")
        (out / item.relative).mkdir(parents=True, exist_ok=True)
        return
    with confine.open_file(item.source, root, "side file") as src:  # checked again, on the opened file
        info = os.fstat(src.fileno())
        if info.st_size > MAX_FILE_BYTES:
            raise CheckpointError(f"side file {item.source} is {info.st_size} bytes; refusing to copy it")
        target = out / item.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with naming_file(target):
            dst_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            with os.fdopen(dst_fd, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


def copy_side_files(source: str | os.PathLike, out: str | os.PathLike,
                    files: list[SideFile] | None = None) -> list[str]:
    """Copy a model folder's side files into ``out``; returns their relative paths.

    Args:
      source: the model folder they come from (its confinement root is checked again).
      out: the output folder (normally the merge's temporary folder).
      files: a list from :func:`plan_side_files` (default: planned now).
    """
    files = plan_side_files(source) if files is None else files
    if not files:
        return []
    root = confine.model_root(source)
    for item in files:
        _copy_one(item, root, Path(out))
    return [item.relative for item in files]


__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MODULES_NAME",
    "SIDE_FILES",
    "SideFile",
    "copy_side_files",
    "plan_side_files",
]
