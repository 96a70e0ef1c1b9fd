"""Atomic writes: build under a temporary name in the destination's directory, then rename.

A rename within one filesystem is atomic, so a reader sees either nothing (or the old
content) or the complete new content, never a half-written file. On any failure, including
``KeyboardInterrupt``, the temporary file or directory is removed and the destination is left
as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from swudi_jax.checkpoint.io.reader import naming_file


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below ``root`` and the directories themselves."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with naming_file(os.path.join(dirpath, name)), open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def current_umask() -> int:
    """The process umask (read from /proc where possible, so it is never changed, even briefly)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_dir_mode() -> int:
    """0777 & ~umask: the mode ``mkdir`` gives (0755 under umask 022; ``mkdtemp`` gives 0700)."""
    return 0o777 & ~current_umask()


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_output_free(out: str | os.PathLike, *, force: bool) -> Path:
    """``out`` as a Path, or a ValueError if it exists and would be overwritten without ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        if not force:
            raise ValueError(f"output {out} exists and is a file; pass --force (force=True) to replace it")
    elif is_nonempty_dir(out) and not force:
        raise ValueError(f"output directory {out} exists and is not empty; pass --force (force=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix) to write; on success it becomes ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it becomes ``out``.

    ``out`` must be absent or an empty directory unless ``force``; with ``force`` an existing
    ``out`` is replaced only after the new content is complete (moved aside, the new
    directory renamed in, then the old one deleted). On failure the temporary directory is
    removed and ``out`` is untouched.
    """
    out = check_output_free(out, force=force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, default_dir_mode())
        yield tmp
        fsync_tree(tmp)
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        fsync_dir(out.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "atomic_directory",
    "atomic_file",
    "check_output_free",
    "current_umask",
    "default_dir_mode",
    "fsync_dir",
    "fsync_tree",
    "is_nonempty_dir",
]
