"""A self-contained demo: merge digit-classifier experts by every method and compare.

Reusable pieces (for example to evaluate a new merging method on the same experts):

- :func:`make_tasks` / :func:`make_pretraining_task`: the tasks, built offline from
  scikit-learn's bundled digits (:class:`Task`: name, train/test arrays, n_classes).
- :func:`build_model`: the Flax Linen MLP backbone; :func:`dense_layers` lists its Dense
  kernels (the keys of calibration Grams).
- :func:`pretrain`, :func:`finetune`: optax training; :func:`evaluate`: per-task accuracy
  of a backbone with each task's head.
- :func:`train_experts`: all of the above in one call; :func:`run_demo` adds the merges and
  returns the table; :func:`main` is the ``swudi-demo`` command.
"""

from swudi_jax.demo.data import TASK_NAMES, Task, make_pretraining_task, make_tasks
from swudi_jax.demo.model import Backbone, Head, build_model, dense_layers, logits
from swudi_jax.demo.run import (
    FULL,
    QUICK,
    QUICK_METHODS,
    DemoConfig,
    Experts,
    calibration_grams,
    format_table,
    indistinct_experts,
    main,
    run_demo,
    train_experts,
)
from swudi_jax.demo.train import evaluate, finetune, pretrain

__all__ = [
    "FULL",
    "QUICK",
    "QUICK_METHODS",
    "TASK_NAMES",
    "Backbone",
    "DemoConfig",
    "Experts",
    "Head",
    "Task",
    "build_model",
    "calibration_grams",
    "dense_layers",
    "evaluate",
    "finetune",
    "format_table",
    "indistinct_experts",
    "logits",
    "main",
    "make_pretraining_task",
    "make_tasks",
    "pretrain",
    "run_demo",
    "train_experts",
]
