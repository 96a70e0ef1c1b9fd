"""Where the tensors are in the folders orbax writes: items, steps, and CheckpointManager roots.

Three kinds of folder, told apart by their content alone (nothing is written, no orbax object
is created):

- an **item** folder: one PyTree checkpoint (``_METADATA`` or ``manifest.ocdbt``, or an old
  ``checkpoint`` file), as ``StandardCheckpointer().save(path, tree)`` writes it;
- a **step** folder: ``<step>/<item>/...`` with one sub-folder per item (``default`` for a
  manager saving one unnamed item, ``params``, ``opt_state``, ... for ``args.Composite``) and
  ``_CHECKPOINT_METADATA``;
- a **manager root**: the ``directory`` of a ``CheckpointManager``, holding step folders named
  ``<step>`` (or ``<prefix>_<step>`` with ``step_prefix``); unfinished saves
  (``*.orbax-checkpoint-tmp-*``) are ignored.

:func:`locate` picks the item folder: from a manager root the latest step unless ``step`` is
given; from a step folder the item ``item`` if given, else ``params``, else ``default``, else the
only item, else it refuses, listing the items.
"""

from __future__ import annotations

import re
from pathlib import Path

from swudi_jax.checkpoint.io.reader import CheckpointError

ITEM_MARKERS = ("_METADATA", "manifest.ocdbt")
PREFERRED_ITEMS = ("params", "default")
_STEP_NAME = re.compile(r"(?:.*_)?([0-9]+)")


def is_item(path: Path) -> bool:
    """A single orbax PyTree checkpoint folder."""
    return path.is_dir() and (any((path / m).is_file() for m in ITEM_MARKERS) or (path / "checkpoint").is_file())


def items(path: Path) -> list[str]:
    """The item names of a step folder (its sub-folders that are item folders), sorted."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and is_item(p))


def is_step(path: Path) -> bool:
    """A step folder: one or more item sub-folders (and not itself an item)."""
    return path.is_dir() and not is_item(path) and bool(items(path))


def steps(path: Path) -> dict[int, Path]:
    """``{step: folder}`` of a CheckpointManager root (empty if ``path`` is not one)."""
    if not path.is_dir() or is_item(path):
        return {}
    found: dict[int, Path] = {}
    for child in path.iterdir():
        match = _STEP_NAME.fullmatch(child.name)
        if match and child.is_dir() and (is_step(child) or is_item(child)):
            step = int(match.group(1))
            if step in found:
                raise CheckpointError(f"{path}: two folders hold step {step}: {found[step].name} and {child.name}")
            found[step] = child
    return dict(sorted(found.items()))


def kind(path: Path) -> str | None:
    """``"item"``, ``"step"``, ``"manager"`` or None for a folder that is none of them."""
    if is_item(path):
        return "item"
    found = steps(path)
    if found and all(_STEP_NAME.fullmatch(name) for name in items(path)):
        return "manager"  # (a manager whose steps are bare items looks like a step folder otherwise)
    if is_step(path):
        return "step"
    return None


def locate(path: Path, *, step: int | None = None, item: str | None = None) -> Path:
    """The item folder to read at ``path`` (an item, step or manager-root folder).

    Args:
      path: the folder named in the config.
      step: the step to read from a manager root (default: the latest).
      item: the item to read from a step (default: ``params``, ``default`` or the only one).
    Raises:
      CheckpointError naming ``path`` and listing the steps or items there when the choice is
      missing, ambiguous, or does not apply (``step`` for a folder that is not a manager root).
    """
    path = Path(path)
    what = kind(path)
    if what is None:
        raise CheckpointError(f"{path}: not an orbax checkpoint: no item folder ({' or '.join(ITEM_MARKERS)}), "
                              f"no step folder (<step>/<item>/) and no CheckpointManager steps (<step>/) found")
    if what == "manager":
        available = steps(path)
        if step is None:
            step = max(available)
        elif step not in available:
            raise CheckpointError(f"{path}: CheckpointManager has no step {step}; steps there: {list(available)}")
        chosen = available[step]
        return chosen if is_item(chosen) else _item(chosen, item)
    if step is not None:
        raise CheckpointError(f"{path}: `step: {step}` applies to a CheckpointManager folder (<dir>/<step>/<item>/); "
                              f"this is already one {what} folder")
    if what == "step":
        return _item(path, item)
    if item is not None:
        raise CheckpointError(f"{path}: `item: {item}` applies to a step folder (<step>/<item>/); "
                              "this is already one item's checkpoint")
    return path


def _item(step_dir: Path, item: str | None) -> Path:
    names = items(step_dir)
    if item is not None:
        if item not in names:
            raise CheckpointError(f"{step_dir}: no item {item!r}; items there: {names}")
        return step_dir / item
    for preferred in PREFERRED_ITEMS:
        if preferred in names:
            return step_dir / preferred
    if len(names) == 1:
        return step_dir / names[0]
    raise CheckpointError(f"{step_dir}: composite checkpoint with items {names} and none named "
                          f"{' or '.join(PREFERRED_ITEMS)}; choose one with `item:` (e.g. {{model: ..., item: {names[0]}}})")


__all__ = [
    "ITEM_MARKERS",
    "PREFERRED_ITEMS",
    "is_item",
    "is_step",
    "items",
    "kind",
    "locate",
    "steps",
]
