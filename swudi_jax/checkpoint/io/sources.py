"""What a model entry of the merge config names, resolved to local folders, and its reader.

A model is written as

- a local path (file or folder): safetensors, orbax (an item,
  a step, or a ``CheckpointManager`` root), msgpack or npz;
- a Hugging Face Hub id ``org/name`` or ``org/name@revision`` that is not a local path: its
  snapshot folder in the local cache (:mod:`swudi_jax.checkpoint.io.hub`; downloaded only with
  ``allow_download``);
- a PEFT LoRA adapter folder (or Hub id): an expert whose weights are the base model's plus
  the adapter's update (:mod:`swudi_jax.checkpoint.io.peft`);
- ``model+adapter`` (mergekit's syntax): the adapter applied to ``model`` instead of the base;
- a mapping ``{model: ..., adapter: ..., step: 100, item: params}``: the same, with ``step``
  (a CheckpointManager's step; default the latest) and ``item`` (a composite step's item;
  default ``params``, ``default`` or the only one) for orbax folders.

Local paths win: a string that exists as a path is never read as a Hub id or split at ``+``.
A relative path is looked up in the search folders in order (:func:`local_path`; for a config
file: the working directory, as mergekit resolves them, then the config's folder).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swudi_jax.checkpoint.io import hub, peft
from swudi_jax.checkpoint.io.reader import CheckpointError, CheckpointReader

MAPPING_KEYS = ("model", "adapter", "step", "item")


@dataclass(frozen=True)
class ModelSource:
    """One resolved model entry.

    Attributes:
      path: the checkpoint read (a Hub id's snapshot folder; for a bare adapter, the base's).
      adapter: a PEFT adapter folder applied on top of ``path``, or None.
      step, item: orbax choices (None: the defaults of :mod:`swudi_jax.checkpoint.io.orbax_layout`).
      hub, adapter_hub: ``org/name@commit`` when ``path`` / ``adapter`` came from the Hub cache.
    """

    path: Path
    adapter: Path | None = None
    step: int | None = None
    item: str | None = None
    hub: str | None = None
    adapter_hub: str | None = None

    @property
    def main(self) -> Path:
        """The folder that stands for this model (the adapter's for adapter experts)."""
        return self.adapter if self.adapter is not None else self.path

    def spec(self) -> str | dict[str, Any]:
        """The config entry that resolves to this source again (Hub ids pinned to their commit)."""
        model = self.hub or str(self.path)
        if self.adapter is None and self.step is None and self.item is None:
            return model
        out: dict[str, Any] = {"model": model}
        if self.adapter is not None:
            out["adapter"] = self.adapter_hub or str(self.adapter)
        if self.step is not None:
            out["step"] = self.step
        if self.item is not None:
            out["item"] = self.item
        return out

    def describe(self) -> str:
        text = self.hub or str(self.path)
        if self.step is not None or self.item is not None:
            text += f" (step {self.step if self.step is not None else 'latest'}, item {self.item or 'default'})"
        return text + (f" + adapter {self.adapter_hub or self.adapter}" if self.adapter is not None else "")

    def open(self, format: str = "auto") -> CheckpointReader:
        """A lazy reader: the checkpoint, or the dense expert base + LoRA update."""
        from swudi_jax.checkpoint.io import open_checkpoint

        reader = open_checkpoint(self.path, format, step=self.step, item=self.item)
        return reader if self.adapter is None else peft.LoraReader(reader, self.adapter)


def search_dirs(base_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[Path, ...]:
    """The folders relative paths are looked up in, in order (one folder or several)."""
    if isinstance(base_dir, (str, os.PathLike)):
        return (Path(base_dir),)
    return tuple(Path(d) for d in base_dir)


def local_path(text: str, dirs: Sequence[Path], where: str) -> Path:
    """The path ``text`` names: itself when absolute, else under the first of ``dirs`` where it
    exists (under the first when it exists nowhere). A relative path that exists under two of
    them as different files is read from the first, with a warning naming both."""
    path = Path(os.path.expanduser(text))
    if path.is_absolute():
        return path
    found = [d / path for d in dirs if (d / path).exists()]
    if len(found) > 1 and found[0].resolve() != found[1].resolve():
        warnings.warn(f"{where}: {text!r} exists both as {found[0]} (working directory) and {found[1]} (beside the "
                      f"config): reading {found[0]}, as mergekit resolves relative paths", stacklevel=2)
    return found[0] if found else dirs[0] / path


def _locate(text: str, dirs: Sequence[Path], where: str, allow_download: bool) -> tuple[Path, str | None] | None:
    """A local path (resolved) or a Hub snapshot (with its ``org/name@commit``); None if neither form applies."""
    path = local_path(text, dirs, where)
    if path.exists():
        if path.is_symlink() and path.is_file():  # e.g. snapshots/<rev>/model.safetensors -> ../../blobs/<hash>:
            return path.parent.resolve() / path.name, None  # keep the name, whose suffix tells the format
        return path.resolve(), None
    parsed = hub.parse_hub_id(text)
    if parsed is None:
        return None
    try:
        snapshot = hub.resolve(*parsed, allow_download=allow_download).absolute()
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc} (no local path {path} either)") from None
    return snapshot, f"{parsed[0]}@{hub.commit_of(snapshot)}"


def _text(value: Any, where: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise CheckpointError(f"{where} must be a path, a Hub id (org/name[@revision]) or model+adapter, got {value!r}")
    return str(value)


def _must_locate(text: str, dirs: Sequence[Path], where: str, allow_download: bool) -> tuple[Path, str | None]:
    found = _locate(text, dirs, where, allow_download)
    if found is None:
        raise CheckpointError(f"{where}: {_missing(text, dirs)}")
    return found


def _missing(text: str, dirs: Sequence[Path]) -> str:
    path = Path(os.path.expanduser(text))
    if path.is_absolute() or len(dirs) == 1:
        return f"{local_path(text, dirs, '')} does not exist"
    return f"{text} does not exist in the working directory {dirs[0]} (nor beside the config, in {dirs[1]})"


def parse_model(value: Any, base_dir: str | os.PathLike | Sequence[str | os.PathLike], where: str, *,
                allow_download: bool = False, base: ModelSource | None = None) -> ModelSource:
    """Resolve one config model entry (see the module docstring) to a :class:`ModelSource`.

    Args:
      value: the entry as written (a string or a mapping).
      base_dir: the folder relative paths start from, or the folders they are looked up in
        (:func:`local_path`).
      where: the entry's name in error messages (``config x.yaml: `models[1]```).
      allow_download: let Hub ids missing from the cache be downloaded.
      base: the resolved base model, which a bare adapter is applied to (None for the base itself).
    Raises:
      CheckpointError naming ``where`` and the path, id or key that is wrong.
    """
    dirs = search_dirs(base_dir)
    step = item = adapter_text = None
    if isinstance(value, Mapping):
        extra = sorted(set(map(str, value)) - set(MAPPING_KEYS))
        if "model" not in value or extra:
            raise CheckpointError(f"{where} must be a path or a mapping with keys {list(MAPPING_KEYS)} (`model` "
                                  f"required), got {dict(value)!r}")
        step, item = value.get("step"), value.get("item")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise CheckpointError(f"{where}: `step` must be a non-negative integer (a CheckpointManager step), got {step!r}")
        if item is not None and (not isinstance(item, str) or not item or "/" in item or item.startswith(".")):
            raise CheckpointError(f"{where}: `item` must be the name of an orbax item folder, got {item!r}")
        if value.get("adapter") is not None:
            adapter_text = _text(value["adapter"], f"{where}: `adapter`")
        value = value["model"]
    text = _text(value, where)
    found = _locate(text, dirs, where, allow_download)
    if found is None and adapter_text is None and "+" in text:
        left, _, right = text.rpartition("+")
        if left and right:
            found = _must_locate(left, dirs, f"{where} (model of {text!r})", allow_download)
            adapter_text = right
            where = f"{where} (adapter of {text!r})"
    if found is None:
        found = _must_locate(text, dirs, where, allow_download)
    path, label = found
    if adapter_text is not None:
        adapter, adapter_label = _must_locate(adapter_text, dirs, where, allow_download)
        if not peft.is_adapter(adapter):
            raise CheckpointError(f"{where}: {adapter} is not a PEFT adapter folder (no {peft.CONFIG_NAME})")
        if peft.is_adapter(path):
            raise CheckpointError(f"{where}: {path} is itself a PEFT adapter; the part before the adapter must be a model")
        return ModelSource(path, adapter, step, item, label, adapter_label)
    if peft.is_adapter(path):
        if base is None:
            raise CheckpointError(f"{where}: {path} is a PEFT adapter, not a model; name the model it applies to "
                                  "(`model+adapter`, or {model: ..., adapter: ...})")
        if step is not None or item is not None:
            raise CheckpointError(f"{where}: `step`/`item` choose inside orbax checkpoints, not PEFT adapters; "
                                  "set them on the base model")
        return ModelSource(base.path, path, base.step, base.item, base.hub, label)
    return ModelSource(path, None, step, item, label, None)


__all__ = [
    "MAPPING_KEYS",
    "ModelSource",
    "parse_model",
]
