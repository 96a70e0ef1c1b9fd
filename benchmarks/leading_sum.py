"""XLA CPU's float32 sum over the models' axis fused with a broadcast weight, against sequential adds.

    PYTHONPATH=. python -m benchmarks.leading_sum

The task-arithmetic family's weighted sum Σi wi·δi over (N, rows, cols) stacks: ``jnp.sum(d * w, 0)``
(what ``mergekit_family._combine`` and ``consensus.disjoint_merge`` ran before) and
:func:`swudi_jax.maths.linalg.sum_leading` (x[0] + x[1] + ..., what they run now), float32 and
bfloat16, N = 3, cols = 768; best of 3 calls after a warm-up. Prints one row per shape.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import sum_leading

FUSED = jax.jit(lambda t, w: jnp.sum(t * w[:, None, None], 0))
SEQUENTIAL = jax.jit(lambda t, w: sum_leading(t * w[:, None, None]))


def best(fn, *args, repeats: int = 3) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    print("| rows | dtype | jnp.sum(d * w, 0) s | sum_leading s | ratio |\n|---|---|---|---|---|")
    for rows in (1024, 2048, 4096):
        for dtype in (jnp.float32, jnp.bfloat16):
            tau = jnp.asarray(np.random.default_rng(0).standard_normal((3, rows, 768), dtype=np.float32)).astype(dtype)
            w = jnp.array([0.5, 0.3, 0.2], dtype)
            fused, seq = best(FUSED, tau, w), best(SEQUENTIAL, tau, w)
            print(f"| {rows} | {jnp.dtype(dtype).name} | {fused:.4f} | {seq:.4f} | {fused / seq:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
