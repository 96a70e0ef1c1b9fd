"""The ``swudi-demo`` command: pre-train, fine-tune N experts, merge them by every method, score.

One small Flax MLP is pre-trained on scikit-learn's digits; N experts are fine-tuned from it
on transformed digits (:mod:`swudi_jax.demo.data`); their backbones are merged with
:func:`swudi_jax.merge` by every registered method at its documented defaults (the data
methods get per-task input Grams from :func:`swudi_jax.model.calibration.task_grams`, each expert on
its own task's training images, as RegMean does); each task keeps its expert's head. The
table gives per-task test accuracy, the mean, and the mean normalised accuracy (a model's
accuracy on a task divided by that task's expert's). Everything runs offline on CPU with
fixed seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from swudi_jax.methods import registry
from swudi_jax.model import calibration
from swudi_jax.demo.data import Task, make_pretraining_task, make_tasks
from swudi_jax.demo.model import Backbone, build_model
from swudi_jax.demo.train import evaluate, finetune, pretrain
from swudi_jax.model.merger import merge


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedules of one demo run.

    Attributes:
      features: the backbone's Dense widths (input 64).
      n_tasks: how many experts (one per task).
      pretrain_steps, pretrain_learning_rate: pre-training on the untransformed digits.
      finetune_steps, learning_rate, head_learning_rate: each expert's fine-tuning.
      batch_size: minibatch size of every training run.
      seed: the data split, pixel permutation, initialisation and minibatches.
      margin: how much better than every other model each expert must be on its own task
        for the experts to count as distinct.
    """

    features: tuple[int, ...] = (256, 256, 128)
    n_tasks: int = 6
    pretrain_steps: int = 1500
    pretrain_learning_rate: float = 1e-3
    finetune_steps: int = 400
    learning_rate: float = 1e-3
    head_learning_rate: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    margin: float = 0.05


FULL = DemoConfig()
"""The configuration ``swudi-demo`` runs."""
QUICK = DemoConfig(features=(64, 64, 32), n_tasks=4, pretrain_steps=300, finetune_steps=150,
                   learning_rate=1e-3, head_learning_rate=1e-2)
"""A tiny configuration for tests (``swudi-demo --quick``)."""
QUICK_METHODS = ("task_arithmetic_paper", "ties_paper", "swudi")
"""The methods ``--quick`` merges with unless ``--methods`` is given."""


class Experts(NamedTuple):
    """A pre-trained backbone, the experts fine-tuned from it, and each task's head."""

    model: Backbone
    tasks: list[Task]
    base: dict
    experts: list[dict]
    heads: list[dict]


def train_experts(config: DemoConfig = FULL, *, log=None) -> Experts:
    """Pre-train the backbone, then fine-tune one expert (backbone and head) per task."""
    log = log or (lambda message: None)
    model = build_model(config.features)
    tasks = make_tasks(config.seed, n_tasks=config.n_tasks)
    log(f"pre-training a {'-'.join(map(str, (64, *config.features)))} MLP on the digits "
        f"({config.pretrain_steps} steps)")
    base, _ = pretrain(model, make_pretraining_task(config.seed), steps=config.pretrain_steps,
                       learning_rate=config.pretrain_learning_rate, batch_size=config.batch_size,
                       seed=config.seed)
    experts, heads = [], []
    for i, task in enumerate(tasks):
        log(f"fine-tuning expert {i + 1}/{len(tasks)} on {task.name!r} ({config.finetune_steps} steps)")
        backbone, head = finetune(model, base, task, steps=config.finetune_steps,
                                  learning_rate=config.learning_rate,
                                  head_learning_rate=config.head_learning_rate,
                                  batch_size=config.batch_size, seed=config.seed + 1 + i)
        experts.append(backbone)
        heads.append(head)
    return Experts(model, tasks, base, experts, heads)


def indistinct_experts(pretrained: np.ndarray, experts: np.ndarray, names: Sequence[str],
                       margin: float) -> list[str]:
    """The tasks whose expert is not best on them by ``margin`` (empty when all are distinct).

    Args:
      pretrained: (N,) the pre-trained model's accuracy per task.
      experts: (N, N) accuracy of expert i (row) on task j (column).
      names: the task names.
      margin: the lead the expert must have over the pre-trained model and every other expert.
    """
    problems = []
    for j, name in enumerate(names):
        others = np.append(np.delete(experts[:, j], j), pretrained[j])
        if experts[j, j] < others.max() + margin:
            problems.append(f"{name}: its expert scores {experts[j, j]:.3f}, the best other model "
                            f"{others.max():.3f} (needs a lead of {margin})")
    return problems


def calibration_grams(setup: Experts) -> dict[str, np.ndarray]:
    """Per-task input Grams {kernel path: (N, n, n)}: expert k on task k's training images.

    Grams are divided by their image counts (:meth:`Calibration.mean_grams`), so tasks weigh
    equally.
    """
    calib = calibration.task_grams(lambda v, x: setup.model.apply(v, x), setup.experts,
                                   [[task.x_train] for task in setup.tasks])
    return calib.mean_grams()


def _row(name: str, kind: str, accuracy: np.ndarray, reference: np.ndarray, **extra: Any) -> dict:
    return {"name": name, "kind": kind, "accuracy": [float(a) for a in accuracy],
            "mean": float(accuracy.mean()), "normalised_mean": float((accuracy / reference).mean()),
            **extra}


def run_demo(config: DemoConfig = FULL, methods: Sequence[str] | None = None, *, log=None) -> dict:
    """The whole demo; returns the table as a JSON-ready dict.

    Args:
      config: sizes and schedules (:data:`FULL` or :data:`QUICK`).
      methods: registered method names to merge with; None means the project's own methods
        (:data:`~swudi_jax.methods.registry.PROJECT_NAMES`; mergekit's need per-model settings).
        Task arithmetic also gets a row at scale 1 (the plain sum of task vectors), where
        interference shows.
      log: a callable for progress lines, or None.
    Returns:
      ``{"config", "tasks", "rows": [{"name", "kind", "accuracy", "mean", "normalised_mean",
      ...}], "experts_distinct", "problems", "seconds"}``; accuracies are fractions in [0, 1].
    """
    log = log or (lambda message: None)
    methods = list(sorted(registry.PROJECT_NAMES) if methods is None else methods)
    resolved = {name: registry.resolve(name) for name in methods}  # an unknown name fails here, before training
    start = time.perf_counter()
    setup = train_experts(config, log=log)
    names = [t.name for t in setup.tasks]
    pretrained = evaluate(setup.model, setup.base, setup.heads, setup.tasks)
    matrix = np.stack([evaluate(setup.model, e, setup.heads, setup.tasks) for e in setup.experts])
    reference = np.diag(matrix)
    problems = indistinct_experts(pretrained, matrix, names, config.margin)
    if problems:
        warnings.warn("the experts are not clearly best on their own tasks, so the table means "
                      "little: " + "; ".join(problems), RuntimeWarning, stacklevel=2)
    rows = [_row("pretrained", "pretrained", pretrained, reference)]
    rows += [_row(f"expert {name}", "expert", matrix[i], reference) for i, name in enumerate(names)]

    grams = None
    if any(r.spec.kind == "data" for r in resolved.values()):
        log("capturing calibration Grams for the data methods")
        grams = calibration_grams(setup)
    runs = [(m, m, None) for m in methods]
    if "task_arithmetic_paper" in methods:
        runs.insert(methods.index("task_arithmetic_paper") + 1, ("task_arithmetic_paper (scale 1)", "task_arithmetic_paper", 1.0))
    for label, method, scale in runs:
        log(f"merging with {label}")
        tic = time.perf_counter()
        run = resolved[method] if scale is None else registry.resolve(method, scale=scale)
        merged = merge(setup.base, setup.experts, run, grams=grams if run.spec.kind == "data" else None)
        seconds = time.perf_counter() - tic
        accuracy = evaluate(setup.model, merged, setup.heads, setup.tasks)
        rows.append(_row(label, "merged", accuracy, reference, method=method,
                         scale=run.scale,
                         merge_seconds=seconds))
    return {"config": dataclasses.asdict(config), "tasks": names, "rows": rows,
            "experts_distinct": not problems, "problems": problems,
            "seconds": time.perf_counter() - start}


def format_table(results: dict) -> str:
    """The results as an aligned text table, accuracies in percent."""
    header = ["model", *results["tasks"], "mean", "norm. mean"]
    body = [[row["name"], *(f"{100 * a:.1f}" for a in row["accuracy"]), f"{100 * row['mean']:.1f}",
             f"{100 * row['normalised_mean']:.1f}"] for row in results["rows"]]
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]

    def line(cells):
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    rule = "-" * len(line(header))
    out = [line(header)]
    previous = None
    for row, cells in zip(results["rows"], body):
        if row["kind"] != previous:  # a rule between pre-trained, experts and merges
            out.append(rule)
        out.append(line(cells))
        previous = row["kind"]
    return "\n".join(out)


def _write_json_atomically(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".swudi-demo-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """``swudi-demo [--quick] [--methods M ...] [--seed S] [--json PATH]``."""
    parser = argparse.ArgumentParser(
        prog="swudi-demo",
        description="Pre-train a small Flax MLP on scikit-learn's digits, fine-tune one expert per "
                    "transformed-digits task, merge the experts by every method and print their "
                    "accuracies.")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny model, {QUICK.n_tasks} tasks, few steps, methods {', '.join(QUICK_METHODS)}")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="methods to merge with (default: the project's own methods)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and training")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    config = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    methods = args.methods or (list(QUICK_METHODS) if args.quick else None)
    if methods is not None:
        known = registry.available_methods()
        unknown = [m for m in methods if m not in known]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; known: {known}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json: the directory of {args.json!r} does not exist")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = run_demo(config, methods, log=log)
    print(format_table(results))
    margin = 100 * config.margin
    verdict = (f"each expert leads on its own task by at least {margin:.0f} points"
               if results["experts_distinct"] else
               "WARNING: some experts are not clearly best on their own task: " + "; ".join(results["problems"]))
    print(f"\n{len(results['tasks'])} tasks; accuracy in % on held-out digits; norm. mean = mean of "
          f"(accuracy / that task's expert's accuracy); {verdict}. Wall time {results['seconds']:.0f} s.")
    if args.json:
        _write_json_atomically(args.json, results)
    return 0


__all__ = [
    "FULL",
    "QUICK",
    "QUICK_METHODS",
    "DemoConfig",
    "Experts",
    "calibration_grams",
    "format_table",
    "indistinct_experts",
    "main",
    "run_demo",
    "train_experts",
]
