"""An output folder that is never someone else's: checked, locked, built aside, moved in last.

:func:`check_output_target` refuses, before any compute and naming the reason, an OUT that
is empty (an unset shell variable), ``.``, the working directory or one of its parents, a
parent of (or equal to) the config file or an input checkpoint, inside an input, or a
symbolic link (without ``force``; with it, the link itself is replaced and its target left
alone), an existing file, and an existing non-empty OUT without ``force``; with ``force``, a
non-empty folder is replaced only if it is an earlier swudi-merge output (it holds the
:data:`RESULT_MARKER` the pipeline writes), never ``$HOME`` or a folder of the user's work.

:class:`OutputSlot` then, for the whole run:

1. takes an exclusive ``fcntl.flock`` on ``.<OUT>.swudi-merge.lock`` next to OUT, so a second
   run to the same OUT fails at once, naming the holder's pid (removed at the end);
2. removes the temporary folders ``.<OUT>.swudi-merge.<random>.tmp`` of earlier killed runs
   for the same OUT, and nothing else (real directories of that name only): the lock proves
   that no live run owns one, whenever the earlier run was killed;
3. records what OUT is now (absent, an empty folder, or, with ``force``, what will be
   replaced: its inode, mode, mtime, and every entry of its whole tree);
4. creates the temporary folder next to OUT (mode 0777 & ~umask, so 0755 under umask 022);
5. :meth:`OutputSlot.publish` moves the result into place only if OUT is still absent or
   an empty folder (a ``rename(2)`` onto anything else fails), or, with ``force``, if OUT is
   still exactly what step 3 recorded; otherwise it fails and keeps both, saying where the
   result is (renamed ``.<OUT>.swudi-merge.<random>.kept``, which no later run removes).
   With ``force`` the old OUT is renamed aside first and restored if the rename in fails,
   then deleted.

Any failure or interrupt before :meth:`publish` removes the temporary folder; OUT is left as
it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from swudi_jax.checkpoint.io.atomic import default_dir_mode, fsync_dir, fsync_tree

TAG = "swudi-merge"
RESULT_MARKER = "merge_config.yaml"
"""Written into every output by the pipeline (its ``CONFIG_NAME``): what makes a folder an earlier output."""


class OutputError(ValueError):
    """An output path that cannot be used, or an output that changed under the run."""


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.{TAG}.lock"


def _temp_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.{TAG}\.[A-Za-z0-9_]+\.tmp")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and any(path.iterdir())


def check_output_target(out: str | os.PathLike, *, protected: Iterable[str | os.PathLike | None] = (),
                        force: bool = False) -> Path:
    """OUT as an absolute Path, or an OutputError saying why it cannot be the output.

    Args:
      out: the output folder as given.
      protected: the config file and every input checkpoint (None entries are skipped).
      force: allow replacing an existing OUT (never one of the refusals above).
    """
    if not isinstance(out, (str, os.PathLike)) or not str(os.fspath(out)).strip():
        raise OutputError(f"output path is empty ({out!r}); an unset shell variable? Name the output folder")
    raw = os.fspath(out)
    absolute = Path(os.path.abspath(raw))
    real = Path(os.path.realpath(absolute))
    if absolute.name in ("", ".", ".."):
        raise OutputError(f"output {raw!r} is not a folder name of its own; name a new folder for the output")
    cwd = Path(os.path.realpath(os.getcwd()))
    for candidate in {absolute, real}:
        if candidate == cwd or cwd.is_relative_to(candidate):
            raise OutputError(f"output {raw!r} is the working directory or one of its parents ({candidate}); "
                              "name a new folder for the output")
    for source in protected:
        if source is None:
            continue
        source_real = Path(os.path.realpath(source))
        for candidate in {absolute, real}:
            if source_real.is_relative_to(candidate):
                raise OutputError(f"output {raw!r} contains (or is) the input {source}; it would be replaced")
            if candidate.is_relative_to(source_real):
                raise OutputError(f"output {raw!r} lies inside the input {source}; choose a folder outside it")
    if absolute.is_symlink():
        if not force:
            target = os.readlink(absolute)
            state = "" if absolute.exists() else "dangling "
            raise OutputError(f"output {absolute} is a {state}symbolic link (to {target}); pass --force (force=True) "
                              "to replace the link itself (its target is left alone), or name another folder")
    elif absolute.exists() and not absolute.is_dir():
        raise OutputError(f"output {absolute} exists and is a file; --force replaces only an earlier swudi-merge "
                          "output folder (or a link); name a new folder for the output")
    elif _is_nonempty_dir(absolute):
        if not force:
            raise OutputError(f"output directory {absolute} exists and is not empty; "
                              "pass --force (force=True) to replace it")
        if not os.path.isfile(absolute / RESULT_MARKER) or os.path.islink(absolute / RESULT_MARKER):
            raise OutputError(f"output directory {absolute} is not empty and is not an earlier swudi-merge output "
                              f"(no {RESULT_MARKER} in it); --force replaces only those, so that $HOME or a "
                              "folder of your work is never deleted; name a new folder for the output")
    return absolute


def _state(path: Path):
    """What is at ``path`` now: None, or (kind, dev, inode, mode, mtime, detail) from lstat."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        detail = os.readlink(path)
    elif stat.S_ISDIR(info.st_mode):
        detail = _tree(path)
    else:
        detail = info.st_size
    return (stat.S_IFMT(info.st_mode), info.st_dev, info.st_ino, info.st_mode, info.st_mtime_ns, detail)


def _tree(folder: Path) -> tuple:
    """Every entry below ``folder`` (links not followed): relative path, type, inode, size, mtime and link
    target, so that a change anywhere inside, not only at the top, is seen."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            link = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
            entries.append((os.path.relpath(path, folder), info.st_mode, info.st_ino, info.st_size,
                            info.st_mtime_ns, link))
    return tuple(sorted(entries))


def _is_empty_dir_state(state) -> bool:
    return state is not None and state[0] == stat.S_IFDIR and state[5] == ()


def stale_temporaries(out: Path) -> list[Path]:
    """Temporary folders of earlier runs for ``out``: ``.<OUT>.swudi-merge.<random>.tmp`` real directories.

    Called only under the lock of ``out``: every run for ``out`` builds its temporary folder while
    holding that lock, so none of these belongs to a live run (a run killed at any instant,
    even before it wrote anything into its folder, leaves one). Links and other names are
    never touched; a result kept aside by :meth:`OutputSlot.publish` is renamed ``.kept``.
    """
    pattern = _temp_pattern(out)
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False))


class OutputSlot:
    """The lock, the temporary folder and the final move for one output folder (a context manager).

    Use::

        out = check_output_target(out, protected=[config, *inputs], force=force)
        with OutputSlot(out, force=force) as slot:
            ...write into slot.tmp...
            slot.publish()
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False):
        self.out = Path(os.path.abspath(out))
        self.force = force
        self.tmp: Path | None = None
        self.removed_stale: list[Path] = []
        self._lock_fd: int | None = None
        self._seen = None
        self._published = False
        self._kept = False

    # -- lock ---------------------------------------------------------------------------------

    def _acquire(self) -> None:
        path = lock_path(self.out)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        for _ in range(20):
            try:
                fd = os.open(path, flags, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {path} for output {self.out} "
                                  f"({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    holder = f" (pid {int(os.pread(fd, 32, 0).split()[0])})"
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputError(f"output {self.out} is being written by another swudi-merge run{holder}, "
                                      f"which holds the lock {path}; wait for it to finish or choose another "
                                      "output") from None
                raise OutputError(f"cannot lock {path} for output {self.out} ({exc.strerror or exc})") from None
            try:  # the holder before us may have removed the file between our open and our lock: retry
                same = os.fstat(fd).st_ino == os.lstat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)
        raise OutputError(f"cannot lock {path} for output {self.out} (the lock file keeps being replaced)")

    def _release(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(lock_path(self.out))  # while still holding the lock (see _acquire's check)
        os.close(self._lock_fd)
        self._lock_fd = None

    # -- context ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            for folder in stale_temporaries(self.out):
                shutil.rmtree(folder)
                self.removed_stale.append(folder)
            check_output_target(self.out, force=self.force)  # again, now under the lock
            self._seen = _state(self.out)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.{TAG}.", suffix=".tmp", dir=self.out.parent))
            try:
                os.chmod(self.tmp, default_dir_mode())
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if not self._published and not self._kept and self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._release()

    # -- the final move -----------------------------------------------------------------------

    def _keep(self, why: str) -> OutputError:
        kept = self.tmp.with_suffix(".kept")  # out of the .tmp names a later run removes
        os.rename(self.tmp, kept)
        self.tmp, self._kept = kept, True
        return OutputError(f"output {self.out} {why}; it was left as it is, and the merged result is kept at "
                           f"{self.tmp} (move it yourself)")

    def publish(self) -> Path:
        """Move the finished temporary folder to OUT (see the module docstring for the rules)."""
        fsync_tree(self.tmp)
        now = _state(self.out)
        replace = self.force and self._seen is not None and not _is_empty_dir_state(self._seen)
        if replace and now is not None:
            if now != self._seen:
                raise self._keep("changed during the run (it is not what this run checked at the start)")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.{TAG}.", suffix=".old", dir=self.out.parent))
            os.rmdir(old)
            os.rename(self.out, old)
            try:
                os.rename(self.tmp, self.out)
            except BaseException:
                os.rename(old, self.out)
                raise
            self._published = True
            fsync_dir(self.out.parent)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
            return self.out
        if now is not None and not _is_empty_dir_state(now):
            raise self._keep("appeared or changed during the run and is not empty")
        try:
            os.rename(self.tmp, self.out)  # onto nothing or an empty folder; anything else fails
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise self._keep("appeared during the run and is not empty") from None
            raise
        self._published = True
        fsync_dir(self.out.parent)
        return self.out


__all__ = [
    "RESULT_MARKER",
    "TAG",
    "OutputError",
    "OutputSlot",
    "check_output_target",
    "lock_path",
    "stale_temporaries",
]
