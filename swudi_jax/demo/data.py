"""The demo's tasks: scikit-learn's 8×8 digits and fixed transformations of them, all offline.

The digits ship inside scikit-learn (``sklearn.datasets.load_digits``: 1,797 images, 8×8,
grey levels 0–16), so nothing is downloaded. Pixels are scaled to [0, 1] and flattened to 64
features. One fixed stratified split into train and test images is shared by every task; a
task applies one deterministic transformation to the images (and possibly maps the labels),
so the experts learn genuinely different input–output maps from the same pictures.

Pre-training uses the untransformed digits; the fine-tuning tasks are the transformed ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

IMAGE_SIDE = 8
N_FEATURES = IMAGE_SIDE * IMAGE_SIDE


@dataclass(frozen=True)
class Task:
    """One classification task: flattened images in [0, 1] (float32) and integer labels.

    Attributes:
      name: a short name for tables.
      x_train, y_train: training images (P, 64) and labels (P,) in [0, n_classes).
      x_test, y_test: held-out images and labels.
      n_classes: the number of classes (the width of the task's head).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


def _images(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(-1, N_FEATURES).astype(np.float32)


def _rotate90(x, rng):
    return _flat(np.rot90(_images(x), k=1, axes=(1, 2)))


def _mirror(x, rng):
    return _flat(_images(x)[:, :, ::-1])


def _invert(x, rng):
    return _flat(1.0 - x)


def _permute(x, rng):
    return _flat(x[:, rng.permutation(N_FEATURES)])


def _checkerboard(x, rng):
    rows, cols = np.indices((IMAGE_SIDE, IMAGE_SIDE))
    sign = np.where((rows + cols) % 2 == 0, 1.0, -1.0).reshape(1, -1)
    return _flat(x * sign)


def _upside_down(x, rng):
    return _flat(_images(x)[:, ::-1, :])


def _digit(y):
    return y, 10


def _parity(y):
    return y % 2, 2


# name, image transformation (x, rng) -> x, label map y -> (y', n_classes)
_TASKS: tuple[tuple[str, Callable, Callable], ...] = (
    ("rotate90", _rotate90, _digit),
    ("mirror", _mirror, _digit),
    ("invert", _invert, _digit),
    ("permute", _permute, _digit),
    ("checker", _checkerboard, _digit),
    ("flip_parity", _upside_down, _parity),
)
TASK_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _TASKS)
"""Every task :func:`make_tasks` can build, in order."""


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # the "demo" extra
        raise ImportError(
            "the demo needs scikit-learn's bundled digits: pip install 'swudi_jax[demo]'"
        ) from exc
    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


def _split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split: the same fraction of every class goes to the test set."""
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits_split(seed: int, test_fraction: float):
    x, y = _load_digits()
    train, test = _split(y, test_fraction, np.random.default_rng(seed))
    return x[train], y[train], x[test], y[test]


def make_pretraining_task(seed: int = 0, *, test_fraction: float = 0.3) -> Task:
    """The untransformed 10-class digits on the same split as :func:`make_tasks`."""
    x_train, y_train, x_test, y_test = _digits_split(seed, test_fraction)
    return Task("digits", x_train, y_train, x_test, y_test, 10)


def make_tasks(seed: int = 0, *, n_tasks: int = 6, test_fraction: float = 0.3) -> list[Task]:
    """The first ``n_tasks`` fine-tuning tasks of :data:`TASK_NAMES`, deterministic in ``seed``.

    Each task transforms every image the same way (rotation, mirror, inversion, a fixed
    pixel permutation, a checkerboard sign flip, an upside-down flip) and may map the labels
    (digit parity), on one stratified split of the digits shared by all tasks.

    Args:
      seed: fixes the split and the random pixel permutation.
      n_tasks: how many tasks, 2 ≤ n_tasks ≤ len(TASK_NAMES).
      test_fraction: the share of each class held out for testing.
    Returns:
      A list of :class:`Task`.
    """
    if not isinstance(n_tasks, int) or not 2 <= n_tasks <= len(_TASKS):
        raise ValueError(f"n_tasks must be an integer in [2, {len(_TASKS)}], got {n_tasks!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x_train, y_train, x_test, y_test = _digits_split(seed, test_fraction)
    tasks = []
    for i, (name, transform, label_map) in enumerate(_TASKS[:n_tasks]):
        # One generator per task, used identically on train and test images.
        train_x = transform(x_train, np.random.default_rng([seed, i]))
        test_x = transform(x_test, np.random.default_rng([seed, i]))
        train_y, n_classes = label_map(y_train)
        test_y, _ = label_map(y_test)
        tasks.append(Task(name, train_x, train_y.astype(np.int32), test_x,
                          test_y.astype(np.int32), n_classes))
    return tasks


__all__ = [
    "IMAGE_SIDE",
    "N_FEATURES",
    "TASK_NAMES",
    "Task",
    "make_pretraining_task",
    "make_tasks",
]
