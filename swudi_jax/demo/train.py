"""Pre-training, fine-tuning and evaluation for the demo, with optax.

Every training run is one jit-compiled ``lax.scan`` over Adam steps on random minibatches
(sampled with replacement from a fixed PRNG key), so it is deterministic given its seed and
makes no host round-trips. The loss is softmax cross-entropy on integer labels.

The recipe: :func:`pretrain` fits a backbone and a 10-class head on the untransformed digits;
:func:`finetune` starts from the pre-trained backbone and a fresh head for one task and trains
both, which gives one expert. The task vector is ``expert − pretrained`` on the backbone only;
each task keeps its expert's head.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from swudi_jax.demo.data import Task
from swudi_jax.demo.model import Backbone, init_backbone, init_head, logits


def _loss(params, x, y, model):
    backbone, head = params
    scores = logits(model, backbone, head, x)
    return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean()


@functools.partial(jax.jit, static_argnames=("model", "steps", "batch_size"))
def _adam_scan(model, backbone, head, x, y, learning_rates, key, steps, batch_size):
    """``steps`` Adam steps on (backbone, head), each with its own learning rate."""
    adam = optax.scale_by_adam()
    grad_fn = jax.grad(_loss)

    def step(carry, step_key):
        params, state = carry
        if batch_size >= x.shape[0]:
            xb, yb = x, y
        else:
            idx = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
            xb, yb = x[idx], y[idx]
        directions, state = adam.update(grad_fn(params, xb, yb, model), state)
        params = tuple(jax.tree.map(lambda p, d, lr=lr: p - lr * d, part, direction)
                       for part, direction, lr in zip(params, directions, learning_rates))
        return (params, state), None

    params = (backbone, head)
    (params, _), _ = jax.lax.scan(step, (params, adam.init(params)), jax.random.split(key, steps))
    return params


def _check_schedule(steps: int, learning_rates: Sequence[float], batch_size: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for lr in learning_rates:
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"learning rates must be > 0, got {lr!r}")


def _train(model, backbone, task, key, steps, learning_rate, head_learning_rate, batch_size):
    _check_schedule(steps, (learning_rate, head_learning_rate), batch_size)
    head_key, train_key = jax.random.split(key)
    head = init_head(head_key, model.features[-1], task.n_classes)
    rates = (jnp.float32(learning_rate), jnp.float32(head_learning_rate))
    return _adam_scan(model, backbone, head, jnp.asarray(task.x_train), jnp.asarray(task.y_train),
                      rates, train_key, steps, batch_size)


def pretrain(model: Backbone, task: Task, *, steps: int = 1500, learning_rate: float = 1e-3,
             batch_size: int = 128, seed: int = 0) -> tuple[dict, dict]:
    """Train a fresh backbone and a fresh head on ``task`` (the untransformed digits).

    Args:
      model: the backbone module (:func:`~swudi_jax.demo.model.build_model`).
      task: the pre-training task.
      steps, learning_rate, batch_size: the Adam schedule (one rate for backbone and head).
      seed: initialisation and minibatch sampling.
    Returns:
      ``(backbone, head)`` variables, each ``{"params": ...}``.
    """
    init_key, key = jax.random.split(jax.random.PRNGKey(seed))
    backbone = init_backbone(model, init_key, task.x_train.shape[1])
    return _train(model, backbone, task, key, steps, learning_rate, learning_rate, batch_size)


def finetune(model: Backbone, backbone: dict, task: Task, *, steps: int = 400,
             learning_rate: float = 1e-3, head_learning_rate: float = 1e-3,
             batch_size: int = 128, seed: int = 0) -> tuple[dict, dict]:
    """One expert: the pre-trained ``backbone`` and a fresh head for ``task``, trained together.

    Args:
      model: the backbone module.
      backbone: the pre-trained backbone variables (not modified: JAX arrays are immutable).
      task: the expert's task.
      steps, batch_size: the Adam schedule.
      learning_rate, head_learning_rate: Adam step sizes for the backbone and the head.
      seed: head initialisation and minibatch sampling.
    Returns:
      ``(expert_backbone, head)``; the task vector is ``expert_backbone − backbone``.
    """
    return _train(model, backbone, task, jax.random.PRNGKey(seed), steps, learning_rate,
                  head_learning_rate, batch_size)


@functools.partial(jax.jit, static_argnames=("model",))
def _accuracy(model, backbone, head, x, y):
    return jnp.mean(jnp.argmax(logits(model, backbone, head, x), axis=-1) == y)


def evaluate(model: Backbone, backbone: dict, heads: Sequence[dict], tasks: Sequence[Task]) -> np.ndarray:
    """Test accuracy of ``backbone`` on each task with that task's head: a (len(tasks),) array."""
    if len(heads) != len(tasks):
        raise ValueError(f"need one head per task, got {len(heads)} heads for {len(tasks)} tasks")
    return np.array([float(_accuracy(model, backbone, head, jnp.asarray(t.x_test), jnp.asarray(t.y_test)))
                     for head, t in zip(heads, tasks)])


__all__ = [
    "evaluate",
    "finetune",
    "pretrain",
]
