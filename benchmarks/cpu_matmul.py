"""The matmul rate each library reaches on SWUDI's Gram products, on this CPU.

A SWUDI layer is its eigh plus its Grams and products (``benchmarks/layer_floor.py``); both sides
of ``benchmarks/vs_torch.py`` call LAPACK ``syevd`` for the eigh, so what separates them is the
rate of the products. This times the per-task Gram τᵢᵀτᵢ (float32, the shapes of a ViT-B/32
block's fc1 and of MiniLM's fc1 and word embedding) as

- JAX under ``jax.jit``, with XLA's default CPU dot and with each CPU matmul library option
  this jaxlib accepts (:data:`XLA_OPTIONS`: oneDNN, XNNPACK, YNNPACK);
- torch's ``a.T @ a`` (MKL in the CPU wheel), when torch is installed;
- NumPy's ``a.T @ a`` (NumPy recognises AᵀA and calls its BLAS's ``syrk``, half the flops).

Rates are in plain-matmul flops (2·rows·n²) over the best of ``--repeats`` calls. ``--threads``
(default 2, set before the libraries load) limits the BLAS and torch pools; XLA's CPU client uses
every core, so the budgets are equal when ``--threads`` is the core count (2 on the machine
measured).
Each side's product is compared with NumPy's in float64 (``rel_diff``, relative Frobenius).

    python -m benchmarks.cpu_matmul                 # a minute on 2 cores
    python -m benchmarks.cpu_matmul --shapes 64x32  # tiny (a smoke run)

Prints a table and writes JSON (default ``benchmarks/results/cpu_matmul.json``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu_matmul.json"
SHAPES = ((3072, 768), (1536, 384), (30522, 384))
XLA_OPTIONS = {
    "xla default": None,
    "xla_cpu_use_onednn": {"xla_cpu_use_onednn": True},
    "xla_cpu_experimental_onednn_custom_call": {"xla_cpu_experimental_onednn_custom_call": True},
    "xla_cpu_use_xnnpack": {"xla_cpu_use_xnnpack": True},
    "xnn dot fusion": {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "ynn dot fusion": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


def sides(a, repeats: int) -> dict[str, tuple[float, float]]:
    """{side: (best seconds of aᵀa, relative difference to aᵀa in float64)} for every JAX option,
    torch (if installed) and NumPy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks._measure import time_calls

    exact = a.astype(np.float64).T @ a.astype(np.float64)
    calls, on_device = {}, jax.device_put(a)
    for name, options in XLA_OPTIONS.items():
        gram = jax.jit(lambda x: jnp.matmul(x.T, x, precision="highest"), compiler_options=options)
        try:
            gram(on_device).block_until_ready()
        except Exception as exc:  # noqa: BLE001 - an option this jaxlib does not take: say so, go on
            print(f"  {name}: not accepted ({(str(exc) or type(exc).__name__).splitlines()[0][:100]})")
            continue
        calls[name] = lambda gram=gram: gram(on_device)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        t = torch.from_numpy(a)
        calls["torch"] = lambda: (t.T @ t).numpy()
    calls["numpy"] = lambda: np.matmul(a.T, a)
    return {name: (min(time_calls(call, repeats=repeats).times),
                   float(np.linalg.norm(np.asarray(call(), np.float64) - exact) / np.linalg.norm(exact)))
            for name, call in calls.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(f"{r}x{n}" for r, n in SHAPES), help="rows x n, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    from benchmarks._measure import machine_info, write_json

    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    rows = []
    for spec in args.shapes.split(","):
        r, n = (int(x) for x in spec.split("x"))
        a = np.random.default_rng(0).standard_normal((r, n), dtype=np.float32)
        for side, (seconds, diff) in sides(a, args.repeats).items():
            rows.append({"rows": r, "n": n, "side": side, "seconds": seconds, "rel_diff": diff,
                         "gflops": 2 * r * n * n / seconds / 1e9})
            print(f"  {r}x{n} {side}: {seconds * 1e3:.1f} ms, {rows[-1]['gflops']:.0f} GFLOP/s, "
                  f"rel. diff {diff:.1e}", flush=True)
    result = {"machine": machine_info(), "threads": args.threads, "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
