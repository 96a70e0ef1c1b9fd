"""Hugging Face Hub ids (``org/name`` or ``org/name@revision``) resolved through the local cache.

The cache layout (``huggingface_hub``'s): ``<cache>/models--org--name/`` holds ``blobs/<hash>``
(the file contents), ``snapshots/<commit>/<file>`` (relative symlinks to ``../../blobs/<hash>``)
and ``refs/<branch or tag>`` (a file holding the commit). A revision is a commit hash, a branch
or a tag; none means ``main``. The cache is ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``, read from the
environment when an id is resolved (not when ``huggingface_hub`` was imported).

Nothing is downloaded unless ``allow_download`` (the config key of that name) is set: the
lookup uses ``snapshot_download(local_files_only=True)``, which only reads the cache. The
result is the snapshot folder, ``.../models--org--name/snapshots/<commit>``; readers open it
like any local model folder (its files are symlinks into the repo's own ``blobs/``). The snapshot
must resolve to a folder directly under the repository's own ``snapshots/``: a ``refs/main``
holding ``../../../elsewhere`` or a snapshot linked out of the cache folder is refused. The
``refs/`` entry is checked first, by this module: it must hold a plain commit name, since
``huggingface_hub`` joins its content to the repository's folders (``snapshots/``, ``trees/``)
and would otherwise read files outside the cache before the snapshot could be checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from swudi_jax.checkpoint.io import confine
from swudi_jax.checkpoint.io.reader import CheckpointError

# org/name with Hub-legal characters, optionally @revision (branch names may hold "/")
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``text`` has the form ``org/name`` or ``org/name@revision``, else None."""
    match = _HUB_ID.fullmatch(text)
    if match is None or ".." in text or text.endswith((".safetensors", ".msgpack", ".npz", ".bin")):
        return None
    return match.group("repo"), match.group("rev")


def cache_dir() -> Path:
    """The Hugging Face hub cache this process would use, from the environment now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expanduser(explicit))
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expanduser(home)) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expanduser(xdg)) / "huggingface" / "hub"


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    """``<cache>/models--org--name``: the cache folder of one model repo."""
    return (cache or cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def resolve(repo_id: str, revision: str | None = None, *, allow_download: bool = False) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default ``main``).

    Args:
      repo_id: ``org/name``.
      revision: a commit hash, branch or tag; None for ``main``.
      allow_download: fetch the repo with ``snapshot_download`` when it is not in the cache
        (off by default: only the cache is read).
    Raises:
      CheckpointError naming the id, the revision and the cache looked in, when the snapshot
      is not there (and downloading is off or failed).
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{repo_id}: resolving Hub ids needs huggingface_hub (pip install huggingface_hub)") from None
    cache = cache_dir()
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    _check_ref(repo_folder(repo_id, cache), revision, where)
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=not allow_download)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types (offline, not found, HTTP)
        repo = repo_folder(repo_id, cache)
        if not repo.is_dir():
            found = f"no {repo.name} folder there"
        else:
            refs = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
            snaps = sorted(p.name for p in (repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
            found = f"{repo.name} has refs {refs} and snapshots {[s[:12] for s in snaps]}"
        hint = ("" if allow_download else
                "; nothing is downloaded unless the config sets `allow_download: true` "
                "(or fetch it first: `huggingface-cli download " + repo_id + "`)")
        raise CheckpointError(f"Hub model {where} is not a local path and is not in the Hugging Face cache "
                              f"{cache} ({found}){hint} [{type(exc).__name__}]") from None
    return _inside_repo(Path(folder), repo_folder(repo_id, cache), where)


def _check_ref(repo: Path, revision: str | None, where: str) -> None:
    """The ``refs/<revision>`` entry (``main`` by default), when the cache has one, is a regular
    file inside the repository folder holding a plain commit name (letters and digits: no
    ``/`` or ``..`` that would lead huggingface_hub out of the cache)."""
    ref = repo / "refs" / (revision or "main")
    if not os.path.lexists(ref) or os.path.isdir(ref):
        return  # a commit given as the revision, or no such ref: huggingface_hub reports it
    with confine.open_file(ref, repo, "Hub cache refs entry") as f:
        content = f.read(256).decode("utf-8", "replace").strip()
    if not re.fullmatch(r"[0-9A-Za-z]+", content):
        raise CheckpointError(f"Hub model {where}: its cache entry {ref} does not hold a commit hash (it holds "
                              f"{content[:80]!r}), so it would lead out of the cache folder; refusing to follow it")


def _inside_repo(snapshot: Path, repo: Path, where: str) -> Path:
    """``repo/snapshots/<commit>`` for a snapshot folder that resolves directly under the repo's
    ``snapshots/``; a CheckpointError for one that leads elsewhere (a ``refs/main`` holding
    ``../../../x``, a snapshot that is a link out of the cache folder)."""
    real, repo_real = Path(os.path.realpath(snapshot)), Path(os.path.realpath(repo))
    if real.parent != repo_real / "snapshots":
        raise CheckpointError(f"Hub model {where}: its snapshot {snapshot} resolves to {real}, which is not a snapshot "
                              f"inside {repo_real / 'snapshots'} (a link or a refs/ entry leading out of the cache "
                              "folder); refusing to read it")
    return repo / "snapshots" / real.name


def commit_of(snapshot: Path) -> str:
    """The commit a snapshot folder holds (its name)."""
    return snapshot.name


__all__ = [
    "cache_dir",
    "commit_of",
    "parse_hub_id",
    "repo_folder",
    "resolve",
]
