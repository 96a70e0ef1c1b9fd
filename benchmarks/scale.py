"""The scale paths against the full path, side by side in one run: low-rank, top-K, sharded.

- **low-rank**: a wide layer, n = 4096 inputs, N = 8 experts of m = 64 outputs (N·m = 512
  < n): ``swudi(solver="lowrank")`` (thin QR of the 4096×512 stack and a 512×512 eigh) vs
  ``swudi(solver="full")`` (the 4096×4096 eigh); and 8 LoRA experts of rank 16 on a
  4096×4096 layer through :func:`swudi_jax.merge_lora` (R = 128) vs ``swudi(solver="full")``
  on the dense products.
- **top-K**: n = 4096, N = 4 experts of m = 1024 (N·m = n, so no low-rank shortcut), task
  vectors with power-law singular values (a decaying spectrum, as fine-tuning deltas have),
  SWUDI at r = 0.01 (K = 41): ``solver="topk"`` (subspace iteration) vs ``solver="full"``,
  end to end (both also form C and D, ~N·m·n² flops) and the eigensolver alone
  (``solvers.top_eigh`` vs ``jnp.linalg.eigh`` on the same C).
- **sharded**: in a subprocess with 8 host CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), :func:`swudi_jax.merge_sharded`
  over 8 devices vs 1 device on the same layer: agreement and overhead. The 8 "devices"
  share the same CPU cores, so this measures the cost of the collectives and the replicated
  eigh, not a speed-up (real speed-ups need real devices).

Times exclude compilation (ahead-of-time compiled first) and are the best of ``--repeats``
calls, the two sides of each ratio interleaved (the machine is shared: the best call is the
least disturbed one; medians are in the JSON too). Agreement is the relative Frobenius difference in
float32 (the full path's null-space rounding makes float32 differ at ~1e-4 on the wide layer;
tests/test_solvers.py checks equality in float64).

    python -m benchmarks.scale            # the full-size table (minutes on 2 shared CPU cores)
    python -m benchmarks.scale --quick    # tiny shapes, a smoke run

Prints a table and writes JSON (default ``benchmarks/results/scale.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._measure import write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scale.json"

FULL = {"lowrank": dict(n_experts=8, m=64, n=4096), "lora": dict(n_experts=8, m=4096, n=4096, rank=16),
        "topk": dict(n_experts=4, m=1024, n=4096, ratio=0.01), "sharded": dict(n_experts=8, m=2048, n=1024)}
QUICK = {"lowrank": dict(n_experts=4, m=8, n=256), "lora": dict(n_experts=3, m=64, n=256, rank=4),
         "topk": dict(n_experts=4, m=96, n=384, ratio=0.03), "sharded": dict(n_experts=4, m=64, n=48)}


def rel_diff(a, b) -> float:
    """Relative Frobenius difference of a from b (of the first element of (λ, V) pairs)."""
    if isinstance(a, tuple):
        a, b = a[0], b[0]
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def wide_stack(rng, n_experts, m, n):
    """Low-rank-plus-noise task vectors (N, m, n), float32."""
    rank = max(1, m // 4)
    low = rng.standard_normal((n_experts, m, rank)) @ rng.standard_normal((n_experts, rank, n)) / np.sqrt(rank * n)
    return (low + 0.05 * rng.standard_normal((n_experts, m, n)) / np.sqrt(n)).astype(np.float32)


def decaying_stack(rng, n_experts, m, n):
    """Task vectors with singular values j^-1 (j = 1..min(m, n)) on random bases, float32."""
    k = min(m, n)
    s = 1.0 / np.arange(1, k + 1)
    out = []
    for _ in range(n_experts):
        u = np.linalg.qr(rng.standard_normal((m, k)))[0]
        v = np.linalg.qr(rng.standard_normal((n, k)))[0]
        out.append((u * s) @ v.T)
    return np.stack(out).astype(np.float32)


def lora_factors(rng, n_experts, m, n, rank):
    return [(rng.standard_normal((m, rank)).astype(np.float32) / np.sqrt(rank),
             rng.standard_normal((rank, n)).astype(np.float32) / np.sqrt(n)) for _ in range(n_experts)]


def compiled(fn, *args):
    """(ahead-of-time compiled fn, compile seconds)."""
    import jax

    start = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return exe, time.perf_counter() - start


def timed(exe, *args):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return out, time.perf_counter() - start


def side_by_side(name, fast_fn, full_fn, fast_args, full_args, repeats, extra=None) -> dict:
    """Compile both, then interleave ``repeats`` timed calls of each; medians and the ratio."""
    fast_exe, fast_compile = compiled(fast_fn, *fast_args)
    full_exe, full_compile = compiled(full_fn, *full_args)
    fast_times, full_times = [], []
    for _ in range(repeats):
        fast_out, t = timed(fast_exe, *fast_args)
        fast_times.append(t)
        full_out, t = timed(full_exe, *full_args)
        full_times.append(t)
    fast_s, full_s = min(fast_times), min(full_times)
    return {"case": name, "fast_s": fast_s, "full_s": full_s, "speedup": full_s / fast_s,
            "median_speedup": statistics.median(full_times) / statistics.median(fast_times),
            "fast_times_s": fast_times, "full_times_s": full_times,
            "compile_s": {"fast": fast_compile, "full": full_compile},
            "rel_diff": rel_diff(fast_out, full_out), **(extra or {})}


def bench_lowrank(cfg, repeats, rng) -> dict:
    import swudi_jax as sj

    tau = wide_stack(rng, cfg["n_experts"], cfg["m"], cfg["n"])
    return side_by_side(
        f"lowrank: swudi, N={cfg['n_experts']}, m={cfg['m']}, n={cfg['n']} (N·m={cfg['n_experts'] * cfg['m']})",
        functools.partial(sj.swudi, solver="lowrank"), functools.partial(sj.swudi, solver="full"),
        (tau,), (tau,), repeats, {"shape": list(tau.shape)})


def bench_lora(cfg, repeats, rng) -> dict:
    import jax.numpy as jnp

    import swudi_jax as sj
    from swudi_jax.scale.lora import _merge_factors, check_lora_factors

    factors = lora_factors(rng, cfg["n_experts"], cfg["m"], cfg["n"], cfg["rank"])
    b, a = check_lora_factors(factors)
    dense = jnp.einsum("kmr,krn->kmn", b, a)
    resolved = sj.resolve("swudi", {"time": 1300.0, "rank_ratio": 0.65, "init": "sum"})
    options = tuple(sorted(resolved.options.items()))
    return side_by_side(
        f"lora: merge_lora swudi, N={cfg['n_experts']}, rank {cfg['rank']}, {cfg['m']}×{cfg['n']} "
        f"(R={cfg['n_experts'] * cfg['rank']})",
        lambda b, a: _merge_factors(b, a, resolved.spec, options), functools.partial(sj.swudi, solver="full"),
        (b, a), (dense,), repeats, {"shape": list(dense.shape)})


def bench_topk(cfg, repeats, rng) -> list[dict]:
    import jax.numpy as jnp

    import swudi_jax as sj
    from swudi_jax.maths import filters, solvers

    tau = decaying_stack(rng, cfg["n_experts"], cfg["m"], cfg["n"])
    k = filters.rank_from_ratio(cfg["ratio"], cfg["n"])
    c = sj.normal_equation(tau).c
    probe = solvers.subspace_iteration(c, k)
    solver_only = side_by_side(
        f"topk eigensolver only: top_eigh(C, K={k}) vs eigh(C), n={cfg['n']}",
        functools.partial(solvers.top_eigh, k=k), lambda c: tuple(x[..., -k:] for x in jnp.linalg.eigh(c)),
        (c,), (c,), repeats)
    end_to_end = side_by_side(
        f"topk: swudi r={cfg['ratio']} (K={k}), N={cfg['n_experts']}, m={cfg['m']}, n={cfg['n']}",
        functools.partial(sj.swudi, rank_ratio=cfg["ratio"], solver="topk"),
        functools.partial(sj.swudi, rank_ratio=cfg["ratio"], solver="full"),
        (tau,), (tau,), repeats,
        {"shape": list(tau.shape), "k": k, "subspace_converged": bool(probe.converged),
         "subspace_iterations": int(probe.iterations)})
    return [end_to_end, solver_only]


def sharded_worker(cfg, repeats) -> dict:
    """Runs inside the 8-device subprocess."""
    import jax

    import swudi_jax as sj
    from swudi_jax.scale.sharding import make_row_mesh, merge_sharded

    tau = wide_stack(np.random.default_rng(1), cfg["n_experts"], cfg["m"], cfg["n"])
    mesh8, mesh1 = make_row_mesh(), make_row_mesh(jax.devices()[:1])
    result = side_by_side(
        f"sharded: swudi on {jax.device_count()} host devices vs 1, N={cfg['n_experts']}, m={cfg['m']}, "
        f"n={cfg['n']}",
        lambda t: merge_sharded(t, mesh8, "swudi", solver="full"),
        lambda t: merge_sharded(t, mesh1, "swudi", solver="full"), (tau,), (tau,), repeats)
    out = merge_sharded(tau, mesh8, "swudi", solver="full")
    single = jax.jit(functools.partial(sj.swudi, solver="full"))(tau)
    result.update(n_devices=jax.device_count(), shard_shapes=sorted({tuple(s.data.shape) for s in out.addressable_shards}),
                  spec=str(out.sharding.spec), rel_diff_vs_swudi=rel_diff(out, single))
    return result


def bench_sharded(cfg, repeats) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    spec = json.dumps({"cfg": cfg, "repeats": repeats})
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--worker", spec], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sharded worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = ["| case | fast path (s) | full path (s) | full / fast | rel. diff | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        notes = []
        if "subspace_iterations" in r:
            notes.append(f"{r['subspace_iterations']} iterations, converged={r['subspace_converged']}")
        if "shard_shapes" in r:
            notes.append(f"shards {r['shard_shapes']} {r['spec']}; vs swudi {r['rel_diff_vs_swudi']:.1e}")
        lines.append(f"| {r['case']} | {r['fast_s']:.3f} | {r['full_s']:.3f} | {r['speedup']:.1f}× | "
                     f"{r['rel_diff']:.1e} | {'; '.join(notes)} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each side (best of)")
    p.add_argument("--cases", default="lowrank,lora,topk,sharded", help="comma-separated subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(sharded_worker(spec["cfg"], spec["repeats"])))
        return {}
    sizes = QUICK if args.quick else FULL
    rng = np.random.default_rng(args.seed)
    runners = {"lowrank": lambda: bench_lowrank(sizes["lowrank"], args.repeats, rng),
               "lora": lambda: bench_lora(sizes["lora"], args.repeats, rng),
               "topk": lambda: bench_topk(sizes["topk"], args.repeats, rng),
               "sharded": lambda: bench_sharded(sizes["sharded"], args.repeats)}
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(runners))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {sorted(runners)}")
    rows = []
    for case in cases:
        new = runners[case]()
        new = new if isinstance(new, list) else [new]
        rows.extend(new)
        print("\n".join(format_table(new).splitlines()[2:]), flush=True)
    import jax

    payload = {"quick": args.quick, "repeats": args.repeats, "sizes": {c: sizes[c] for c in cases},
               "jax": jax.__version__, "cpu_count": os.cpu_count(), "results": rows}
    print()
    print(format_table(rows))
    write_json(args.out, payload)
    print(f"\nJSON: {args.out}")
    return payload


if __name__ == "__main__":
    main()
