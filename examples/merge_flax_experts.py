"""Merge fine-tuned Flax experts in memory with every data-free method, and compare them.

Four synthetic tasks share one labelling function but live in different regions of input
space. A small Flax Linen MLP is pre-trained briefly on a little of each, then fine-tuned
once per task (the experts); the experts are merged back into one model
with ``swudi_jax.merge`` and every merged model is scored on every task.

    python examples/merge_flax_experts.py            # 1-2 minutes on 2 CPU cores
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import swudi_jax as sj

N_TASKS, DIM, CLASSES, SAMPLES = 4, 24, 6, 2048


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(96)(x))
        x = nn.LayerNorm()(x)
        x = nn.relu(nn.Dense(96)(x))
        return nn.Dense(CLASSES)(x)


def make_task(rng: np.random.Generator, teacher):
    """One region of input space (its own centre), labelled by the shared teacher."""
    centre = 3.0 * rng.normal(size=DIM) / np.sqrt(DIM)

    def sample(n, seed):
        x = (0.8 * np.random.default_rng(seed).normal(size=(n, DIM)) + centre).astype(np.float32)
        return x, teacher(x)

    return sample


def train(model, params, x, y, steps, lr):
    opt = optax.adam(lr)

    @jax.jit
    def step(params, state, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 128)
        params, state = step(params, state, x[idx], y[idx])
    return params


def accuracy(model, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(model.apply({"params": params}, x), axis=1) == y))


def main() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(DIM, 32)), rng.normal(size=(32, CLASSES))
    teacher = lambda x: np.argmax(np.tanh(x @ a / np.sqrt(DIM)) @ b, axis=1)  # noqa: E731
    tasks = [make_task(rng, teacher) for _ in range(N_TASKS)]
    train_sets = [t(SAMPLES, seed=10 + i) for i, t in enumerate(tasks)]
    test_sets = [t(1000, seed=100 + i) for i, t in enumerate(tasks)]

    model = MLP()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, DIM)))["params"]
    mix_x = np.concatenate([x[: SAMPLES // 16] for x, _ in train_sets])
    mix_y = np.concatenate([y[: SAMPLES // 16] for _, y in train_sets])
    base = train(model, params, mix_x, mix_y, steps=100, lr=1e-3)  # a weak generalist
    experts = [train(model, base, x, y, steps=200, lr=3e-4) for x, y in train_sets]

    rows = [("base (pre-trained)", base, 0.0)]
    rows += [(f"expert {i}", e, 0.0) for i, e in enumerate(experts)]
    methods = ["task_arithmetic", "task_arithmetic_paper", "average", "ties", "dare", "wudi", "pinv", "swudi",
               "swudi_a"]
    for method in methods:
        start = time.perf_counter()
        merged = sj.merge(base, experts, method=method, layout="flax")
        jax.block_until_ready(merged)
        rows.append((method, merged, time.perf_counter() - start))

    header = f"{'model':<20}" + "".join(f"{'task ' + str(i):>8}" for i in range(N_TASKS)) + f"{'mean':>8}{'merge s':>9}"
    print(header)
    print("-" * len(header))
    for name, p, seconds in rows:
        accs = [accuracy(model, p, x, y) for x, y in test_sets]
        timing = f"{seconds:9.2f}" if seconds else " " * 9
        print(f"{name:<20}" + "".join(f"{a:8.3f}" for a in accs) + f"{np.mean(accs):8.3f}" + timing)
    scales = ", ".join(f"{m} {sj.registry.default_scale(m):g}" for m in methods)  # what ran, read from the registry
    swudi = sj.registry.resolve("swudi").options
    print(f"\nmerge s includes compilation; every method at its defaults. Scale s in base + s·(merged task vector): "
          f"{scales} (mergekit's task_arithmetic sums the task vectors; task_arithmetic_paper is the paper's λ). "
          f"SWUDI t = {swudi['time']:g}, r = {swudi['rank_ratio']:g}.")


if __name__ == "__main__":
    main()
