"""Run by tests/test_compile_cache.py in a fresh process: enable the persistent compilation
cache, merge a tiny model, and print (as JSON) the cache folder, the cache hits and misses
JAX reported (its monitoring events) and the files in the folder."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax._src import monitoring

EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
counts = {"hits": 0, "misses": 0}


def _listen(event, **kwargs):
    if event in EVENTS:
        counts[EVENTS[event]] += 1


def main():
    monitoring.register_event_listener(_listen)
    from swudi_jax.checkpoint.compile_cache import enable_compile_cache

    folder = enable_compile_cache()
    import swudi_jax as sj

    rng = np.random.default_rng(0)
    base = {"layer.weight": rng.normal(size=(6, 5)).astype(np.float32),
            "layer.bias": rng.normal(size=(6,)).astype(np.float32)}
    experts = [{k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(3)]
    merged = sj.merge(base, experts, "swudi", layout="torch")
    jax.block_until_ready(merged)
    files = sorted(os.listdir(folder)) if folder is not None and folder.exists() else []
    print(json.dumps({"folder": None if folder is None else str(folder), **counts, "files": len(files),
                      "checksum": float(sum(np.abs(np.asarray(v)).sum() for v in merged.values()))}))


if __name__ == "__main__":
    main()
