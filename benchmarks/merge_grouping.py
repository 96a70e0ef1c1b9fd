"""Grouped vs per-leaf merging of a whole Flax model: one vmapped call per shape group.

``swudi_jax.merge`` stacks the linear weights of one maths shape and runs the layer method
under ``jax.vmap`` in one compiled call per group. This benchmark merges a ViT-like Flax
tree (``--blocks`` blocks of attention DenseGeneral kernels and an MLP) both ways, side by
side in one run: grouped (the default) and one leaf per call (``max_group_bytes=1``). It
reports the first call (compilation included) and the median of later calls, and checks
that both give the same weights. Prints a table and writes JSON (default
``benchmarks/results/merge_grouping.json``).

    python benchmarks/merge_grouping.py                 # --blocks 12 --width 192 --experts 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine_info, time_calls  # noqa: E402

import swudi_jax as sj  # noqa: E402


def vit_like(blocks: int, width: int, heads: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)

    head_dim = width // heads
    tree = {}
    for b in range(blocks):
        tree[f"block_{b}"] = {
            "attn": {name: {"kernel": w(width, heads, head_dim), "bias": w(heads, head_dim)}
                     for name in ("query", "key", "value")}
            | {"out": {"kernel": w(heads, head_dim, width), "bias": w(width)}},
            "mlp_in": {"kernel": w(width, 4 * width), "bias": w(4 * width)},
            "mlp_out": {"kernel": w(4 * width, width), "bias": w(width)},
            "norm": {"scale": np.ones(width, np.float32), "bias": np.zeros(width, np.float32)},
        }
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["swudi", "task_arithmetic_paper"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "merge_grouping.json")
    args = parser.parse_args()

    base = vit_like(args.blocks, args.width, args.heads, 0)
    experts = [jax.tree_util.tree_map(lambda x, d: x + 0.01 * d, base, vit_like(args.blocks, args.width, args.heads, i + 1))
               for i in range(args.experts)]
    n_leaves = len(jax.tree_util.tree_leaves(base))
    rows = []
    for method in args.methods:
        outputs = {}
        for mode, max_bytes in (("grouped", sj.tree.DEFAULT_MAX_GROUP_BYTES), ("per-leaf", 1)):
            run = lambda: sj.merge(base, experts, method=method, max_group_bytes=max_bytes)  # noqa: E731
            start = time.perf_counter()
            outputs[mode] = jax.block_until_ready(run())
            first = time.perf_counter() - start
            later = time_calls(run, repeats=args.repeats, warmup=0)
            rows.append({"method": method, "mode": mode, "first_call_s": first, "median_call_s": later.median,
                         "times_s": later.times})
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
            jax.tree_util.tree_leaves(outputs["grouped"]), jax.tree_util.tree_leaves(outputs["per-leaf"])))
        for row in rows[-2:]:
            row["max_abs_diff_grouped_vs_per_leaf"] = diff

    print(f"{args.blocks} blocks, width {args.width}, {n_leaves} leaves, {args.experts} experts, float32, "
          f"{jax.devices()[0].platform}")
    print(f"{'method':<17}{'mode':<10}{'first call s':>13}{'median s':>10}{'speed-up':>10}{'max |diff|':>12}")
    for i, row in enumerate(rows):
        ref = rows[i - 1 if row["mode"] == "per-leaf" else i + 1]
        speedup = ref["median_call_s"] / row["median_call_s"] if row["mode"] == "grouped" else 1.0
        row["median_speedup_vs_per_leaf"] = speedup if row["mode"] == "grouped" else None
        print(f"{row['method']:<17}{row['mode']:<10}{row['first_call_s']:13.2f}{row['median_call_s']:10.3f}"
              f"{speedup:10.2f}{row['max_abs_diff_grouped_vs_per_leaf']:12.2e}")
    result = {"config": vars(args) | {"json": str(args.json), "leaves": n_leaves}, "rows": rows,
              "machine": machine_info()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
