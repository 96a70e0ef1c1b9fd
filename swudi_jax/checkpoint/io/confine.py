"""Confinement: every file a checkpoint reader opens lies inside the model folder.

A model folder downloaded from someone else can hold symbolic links (``config.json ->
/home/me/.ssh/id_rsa``) or an index naming ``../other/model.safetensors`` or ``/etc/shadow``.
Before anything is opened, each path is resolved (``os.path.realpath``: every link followed)
and must fall inside the folder's *confinement root*, and must be a regular file (a FIFO or a
device would block or never end).

The confinement root is the model folder itself after resolving, with one exception users
rely on: the Hugging Face cache layout ``.../models--org--name/snapshots/<rev>/<file>``, whose
files are links to ``../../blobs/<hash>``. For a folder directly under ``snapshots/`` of a
``models--*`` (or ``datasets--*``) folder, the root is that ``models--org--name`` folder, so
the blob links resolve inside it while anything outside the repository's cache folder is
still refused.

The root is found from the path as written as well as from where it leads: a folder written as
``.../models--org--name/snapshots/<rev>`` has that repository folder as its root even when
``<rev>`` itself is a link, and the folder must then resolve inside it (a snapshot linked to
``/home/me`` is refused, so are ``refs/main`` naming ``../../../elsewhere``, see
:mod:`swudi_jax.checkpoint.io.hub`). A model *folder* named in the config may itself be a link (the
config is the user's: it is followed, and its target is the root); a model *file* named directly
gets the rule of a file inside a folder: it must resolve inside the folder that holds it (or that
folder's Hugging Face repository), so ``model.safetensors -> /elsewhere/x`` is refused either way.

Checking a path and then opening it leaves a gap: the file can be replaced by a link between
the two. :func:`open_file` closes it: it opens the path once (never blocking, ``O_NONBLOCK``),
checks the *opened* file (``fstat``: a regular file) and that it is the very file (same device and
inode) found at the resolved path inside the root, after the open; everything is then read from
that handle. Every reader here reads its files through it.

Index entries (``weight_map`` values) must be plain file names: no separator, not ``.`` or
``..``, not absolute. They are refused from the index text alone, before anything is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from swudi_jax.checkpoint.io.reader import CheckpointError

HF_CACHE_PREFIXES = ("models--", "datasets--")


def model_root(path: str | os.PathLike) -> Path:
    """The folder every file of the checkpoint at ``path`` must resolve into.

    ``path`` is a model folder or a single checkpoint file (whose folder is then used).
    """
    path = Path(os.path.abspath(path))
    folder = path if path.is_dir() else path.parent
    real = Path(os.path.realpath(folder))
    for candidate in (folder, real):  # the path as written, then where it leads
        if candidate.parent.name == "snapshots" and candidate.parent.parent.name.startswith(HF_CACHE_PREFIXES):
            repo = Path(os.path.realpath(candidate.parent.parent))
            if not real.is_relative_to(repo / "snapshots"):
                raise CheckpointError(f"Hugging Face snapshot {folder} resolves to {real}, outside its repository "
                                      f"folder {repo}; refusing to read it")
            return repo
    return real


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def confined_file(path: str | os.PathLike, root: str | os.PathLike, what: str = "file") -> Path:
    """``path`` resolved, after checking it lies inside ``root`` and is a regular file.

    Nothing is opened: only ``realpath`` and ``stat``.

    Raises:
      CheckpointError naming ``path``, where it leads and the root.
    """
    path, root = Path(path), Path(root)
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise CheckpointError(f"{what} {path} resolves to {real}, outside the model folder {root}; refusing to open it")
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise CheckpointError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what} {path} is {_kind(mode)}, not a regular file; refusing to open it")
    return real


def open_file(path: str | os.PathLike, root: str | os.PathLike, what: str = "file") -> BinaryIO:
    """``path`` opened for reading, after checking the opened file itself (see the module docstring).

    Checked before opening (:func:`confined_file`: a FIFO or device is never opened), opened
    without blocking, then verified on the handle: a regular file, and the same file (device,
    inode) as the one ``path`` resolves to inside ``root`` now. Read everything from the
    returned file object, never from ``path`` again.

    Raises:
      CheckpointError naming ``path`` when it leads outside ``root``, is not a regular file, or
      was replaced while being opened.
    """
    confined_file(path, root, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise CheckpointError(f"{what} {path} is {_kind(opened.st_mode)}, not a regular file; refusing to read it")
        real = confined_file(path, root, what)
        now = os.stat(real)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise CheckpointError(f"{what} {path} was replaced while it was opened (it is no longer the file "
                                  f"at {real}); refusing to read it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(path: str | os.PathLike, root: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of ``path``, read through :func:`open_file`."""
    with open_file(path, root, what) as f:
        try:
            return f.read()
        except OSError as exc:
            raise CheckpointError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None


def confined_dir(path: str | os.PathLike, root: str | os.PathLike, what: str = "folder") -> Path:
    """``path`` resolved, after checking it lies inside ``root`` and is a directory."""
    path, root = Path(path), Path(root)
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise CheckpointError(f"{what} {path} resolves to {real}, outside the model folder {root}; refusing to open it")
    if not real.is_dir():
        raise CheckpointError(f"{what} {path} is not a directory")
    return real


def checked_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """A single-file checkpoint: resolved inside its own folder's root and regular."""
    return confined_file(path, model_root(path), what)


def check_tree(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Every file and link below ``folder`` stays inside ``root`` (default: the folder's root).

    For formats whose library opens files on its own (orbax): walked without following
    links; each link is resolved and checked, each file must be regular.
    """
    folder = Path(folder)
    root = model_root(folder) if root is None else Path(root)
    confined_dir(folder, root, "checkpoint folder")
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames:
            entry = Path(dirpath) / name
            if entry.is_symlink():
                confined_dir(entry, root, "checkpoint folder")
                check_tree(entry, root)
        for name in filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink() and os.path.isdir(entry):
                confined_dir(entry, root, "checkpoint folder")
                check_tree(entry, root)
            else:
                confined_file(entry, root, "checkpoint file")


def plain_name(name: object, where: str, key: str) -> str:
    """An index entry that is a plain file name inside the folder, or a CheckpointError."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name) or os.path.basename(name) != name):
        raise CheckpointError(f"{where}: entry {key!r} names {name!r}, which is not a plain file name inside the "
                              "model folder; refusing it")
    return name


__all__ = [
    "HF_CACHE_PREFIXES",
    "check_tree",
    "checked_file",
    "confined_dir",
    "confined_file",
    "model_root",
    "open_file",
    "plain_name",
    "read_file",
]
