"""SWUDI on Llama-7B's layer shapes: swudi_jax against the same maths in PyTorch, one layer per
process, and the projected time of a whole 7B merge from those figures.

Shapes (maths layout, m outputs × n inputs; 3 synthetic experts each, rank-16 signal plus
dense noise as in ``benchmarks/layer_speed.py``):

- ``attn`` 4096 × 4096 (q, k, v, o: 4 per block), C is 4096²;
- ``up`` 11008 × 4096 (gate, up: 2 per block), C is 4096²;
- ``down`` 4096 × 11008 (down: 1 per block), C is 11008² — N·m = 12288 ≥ n, so no low-rank
  shortcut: the full 11008² ``eigh`` runs.

Each (side, shape) runs in its own process (``benchmarks/_measure.run_worker``: peak RSS from
``wait4``, which includes the inputs and the runtime): JAX ``swudi_jax.swudi`` (jit, float32;
compile timed apart, then ``--repeats`` warm calls) and the PyTorch transcription of
``benchmarks/vs_torch.py`` (``torch.linalg.eigh``, same thread budget). The worker also times
the stages of the JAX side (C and D; ``eigh``; the rest) to say what dominates.

Projection (stated as such): a Llama-2-7B merge = 32 blocks × (4 attn + 2 up + 1 down) layers +
the token embedding (32000 × 4096, C is 4096², one attn-shaped eigh plus its larger products,
counted as one ``up`` layer) — the head and norms get the mean task vector (negligible).

    python -m benchmarks.llm_layers                      # all three shapes, both sides (~15 min idle)
    python -m benchmarks.llm_layers --shapes attn --repeats 1
    python -m benchmarks.llm_layers --quick              # tiny shapes, a smoke run

Writes ``benchmarks/results/llm_layers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks import _measure

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "llm_layers.json"
SHAPES = {"attn": (4096, 4096), "up": (11008, 4096), "down": (4096, 11008)}
QUICK_SHAPES = {"attn": (128, 128), "up": (344, 128), "down": (128, 344)}
PER_BLOCK = {"attn": 4, "up": 2, "down": 1}
BLOCKS, N_EXPERTS, TIME, RANK_RATIO = 32, 3, 1300.0, 0.65


def task_vectors(m: int, n: int, n_experts: int, seed: int = 0):
    """(N, m, n) float32: a rank-16 signal per expert plus dense noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.empty((n_experts, m, n), np.float32)
    for i in range(n_experts):
        left = rng.standard_normal((m, 16), dtype=np.float32)
        right = rng.standard_normal((16, n), dtype=np.float32)
        out[i] = (left @ right) / np.sqrt(16 * n) + 0.01 * rng.standard_normal((m, n), dtype=np.float32)
    return out


def _jax_stages(tau) -> dict:
    """Seconds of SWUDI's stages on the JAX side: C and D, the eigh, the rest (one warm call each)."""
    import jax
    import jax.numpy as jnp

    from swudi_jax.maths import spectral

    weights = spectral.task_weights(tau)
    form = jax.jit(lambda t, w: spectral.interference_and_rhs(t, w))
    c, d = jax.block_until_ready(form(tau, weights))
    start = time.perf_counter()
    jax.block_until_ready(form(tau, weights))
    stages = {"c_and_d_s": time.perf_counter() - start}
    eigh = jax.jit(jnp.linalg.eigh)
    jax.block_until_ready(eigh(c))
    start = time.perf_counter()
    jax.block_until_ready(eigh(c))
    stages["eigh_s"] = time.perf_counter() - start
    return stages


def worker(side: str, shape: tuple[int, int], repeats: int) -> dict:
    """One (side, shape): compile/first call, warm median, and the JAX stage split."""
    tau_np = task_vectors(*shape, N_EXPERTS)
    if side == "jax":
        import jax

        import swudi_jax as sj

        tau = jax.device_put(tau_np)
        call = jax.jit(lambda t: sj.swudi(t, time=TIME, rank_ratio=RANK_RATIO))
        _, first = _measure.compile_timed(call, tau)
        timing = _measure.time_calls(lambda: call(tau), repeats=repeats, warmup=1)
        result = {"compile_s": first, "warm_s": timing.median, "all_s": timing.times}
        result.update(_jax_stages(tau))
        return result
    import torch

    from benchmarks.vs_torch import torch_swudi

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    tau = torch.from_numpy(tau_np)
    times = []
    with torch.no_grad():
        torch_swudi(tau, TIME, RANK_RATIO)
        for _ in range(repeats):
            start = time.perf_counter()
            torch_swudi(tau, TIME, RANK_RATIO)
            times.append(time.perf_counter() - start)
    return {"warm_s": statistics.median(times), "all_s": times}


def projection(rows: dict) -> dict:
    """A whole Llama-2-7B SWUDI merge's seconds per side, from the per-layer warm medians."""
    out = {}
    for side in ("jax", "torch"):
        per = {k: rows[k][side]["warm_s"] for k in PER_BLOCK if k in rows and side in rows[k]}
        if len(per) == len(PER_BLOCK):
            out[side + "_s"] = BLOCKS * sum(PER_BLOCK[k] * per[k] for k in PER_BLOCK) + per["up"]
    return out


def run(shapes: dict, repeats: int, threads: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    rows: dict = {}
    for i, (name, shape) in enumerate(shapes.items()):
        rows[name] = {"shape": list(shape)}
        sides = ("jax", "torch") if i % 2 == 0 else ("torch", "jax")
        for side in sides:
            argv = [sys.executable, "-m", "benchmarks.llm_layers", "--worker", side, "--shape",
                    f"{shape[0]}x{shape[1]}", "--repeats", str(repeats)]
            rows[name][side] = _measure.run_worker(argv, cwd=str(ROOT), env=env)
            r = rows[name][side]
            print(f"  {name} {shape[0]}x{shape[1]} {side}: warm {r['warm_s']:.2f} s, peak RSS "
                  f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB", flush=True)
    return rows


def format_table(rows: dict) -> str:
    lines = ["| layer | m × n | JAX s | torch s | JAX / torch | JAX peak MiB | torch peak MiB | JAX: C+D / eigh s |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        j, t = row["jax"], row["torch"]
        lines.append(f"| {name} | {row['shape'][0]}×{row['shape'][1]} | {j['warm_s']:.2f} | {t['warm_s']:.2f} | "
                     f"{j['warm_s'] / t['warm_s']:.2f} | {j['peak_rss_bytes'] / 2**20:,.0f} | "
                     f"{t['peak_rss_bytes'] / 2**20:,.0f} | {j['c_and_d_s']:.2f} / {j['eigh_s']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: attn, up, down")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads on both sides")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        m, n = (int(x) for x in args.shape.split("x"))
        _measure.emit_result(worker(args.worker, (m, n), args.repeats))
        return {}
    table = QUICK_SHAPES if args.quick else SHAPES
    shapes = {k: table[k] for k in args.shapes.split(",")}
    rows = run(shapes, args.repeats, args.threads)
    payload = {"rows": rows, "projection_7b": projection(rows), "experts": N_EXPERTS,
               "machine": _measure.machine_info()}
    _measure.write_json(args.out, payload)
    print(format_table(rows))
    print("projected Llama-2-7B merge (s):", json.dumps(payload["projection_7b"]))
    return payload


if __name__ == "__main__":
    main()
