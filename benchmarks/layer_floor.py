"""Where one SWUDI layer's time goes, and how far it is from its floor.

Per layer group of a ViT-B/32 block (q, k, v, o 768², fc1 3072×768, fc2 768×3072; 8 experts)
or of a MiniLM-L6 layer (q, k, v, o 384², fc1 1536×384, fc2 384×1536; 5 experts), float32,
each group one ``jax.jit(jax.vmap(swudi))`` call as the whole-model merge makes it:

- ``swudi``: the whole estimator (:func:`swudi_jax.swudi`, default solver);
- ``eigh``: ``jax.vmap(jnp.linalg.eigh)`` on the same C matrices (LAPACK ``syevd``);
- ``gemm``: one large float32 matmul, for the machine's measured matmul rate;
- the floor: eigh time + the minimal matmul flops of the estimator at that rate. The minimal
  flops are C as a symmetric Gram, D in its cheaper association and the reconstruction from
  the K = ⌈r·n⌉ kept eigenvectors (:func:`minimal_flops`; very tall layers that form D V_K
  without D need fewer, so their floor is overstated).

Calls are interleaved (round-robin, ``--rounds`` rounds) and the best time of each is kept,
so a drifting machine load hits every column alike. ``--before REV`` also times SWUDI built
on ``swudi_jax/maths/spectral.py`` (``swudi_jax/spectral.py`` before the move) as it was at
git revision REV (loaded beside the current one in the same process, interleaved with it),
for a before/after ratio from one invocation;
``--min-block B`` instead times the current SWUDI with its symmetric Grams cut into column
blocks of at least B (:data:`swudi_jax.maths.gram.MIN_BLOCK`) as the "before".

    python -m benchmarks.layer_floor                      # ViT block
    python -m benchmarks.layer_floor --preset minilm
    python -m benchmarks.layer_floor --before 457397b --rounds 5
    python -m benchmarks.layer_floor --min-block 512 --rounds 7

Prints a table and writes JSON (default ``benchmarks/results/layer_floor.json``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks._measure import write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "layer_floor.json"
PRESETS = {
    # name: (experts, [(group, layers, m, n)])
    "vit_b32": (8, [("attn q,k,v,o", 4, 768, 768), ("mlp fc1", 1, 3072, 768), ("mlp fc2", 1, 768, 3072)]),
    "minilm": (5, [("attn q,k,v,o", 24, 384, 384), ("mlp fc1", 6, 1536, 384), ("mlp fc2", 6, 384, 1536),
               ("word embeddings", 1, 30522, 384)]),
    "tiny": (3, [("square", 2, 16, 16), ("wide", 1, 8, 32)]),
}


def minimal_flops(n_tasks: int, m: int, n: int, rank_ratio: float = 0.65) -> dict:
    """Matmul flops no implementation of the estimator that forms D avoids (our accounting):

    C: a symmetric Gram of the N·m weighted rows, N·m·n² (half of 2·N·m·n²);
    D: per task min over the two associations of τiτiᵀτi with the inner Gram symmetric,
       min(m²n + 2m²n, mn² + 2mn²) = 3·m·n·min(m, n), unless C's Grams are shared (square
       and tall layers: then C and D together cost N·(m n² + 2 m n²));
    reconstruction from K = ⌈r·n⌉ eigenvectors: [D; θ0]V_K (4·m·n·K) and coeffs·V_Kᵀ (2·m·n·K).
    Very tall layers that form D V_K without D (``spectral.projects_per_task``) need fewer.
    """
    k = min(n, max(1, int(np.ceil(rank_ratio * n))))
    apart = n_tasks * m * n * n + n_tasks * 3 * m * n * min(m, n)
    shared = n_tasks * 3 * m * n * n
    return {"c_and_d": min(apart, shared), "reconstruction": 6 * m * n * k}


def _inputs(preset: str, seed: int):
    from benchmarks.layer_speed import synthetic_layer

    experts, groups = PRESETS[preset]
    out = []
    for gi, (name, layers, m, n) in enumerate(groups):
        stack = np.stack([synthetic_layer(np.random.default_rng([seed, gi, j]), experts, m, n, min(16, m, n), 0.1)
                          for j in range(layers)])
        out.append((name, stack))
    return out


def measure(preset: str, rounds: int, seed: int, before: str | None = None, min_block: int | None = None) -> dict:
    """Time swudi, eigh and a gemm per group in this process (interleaved; best of rounds);
    with ``before`` (a git revision) also SWUDI on that revision's spectral.py, with
    ``min_block`` also SWUDI with Gram column blocks of at least ``min_block``."""
    import jax
    import jax.numpy as jnp

    import swudi_jax as sj
    from swudi_jax.maths import spectral

    groups = _inputs(preset, seed)
    baseline = bool(before or min_block)
    merge = jax.jit(jax.vmap(sj.swudi))
    variants = [("swudi", merge)]
    if before:
        variants.append(("before", jax.jit(jax.vmap(swudi_with(spectral_at(before))))))
    elif min_block:
        variants.append(("before", jax.jit(jax.vmap(with_min_block(min_block, swudi_with(spectral))))))
    form_c = jax.jit(jax.vmap(lambda t: sj.interference_operator(t, sj.task_weights(t))))
    eigh = jax.jit(jax.vmap(jnp.linalg.eigh))
    calls, compile_s = {}, {}
    for name, stack in groups:
        x = jax.device_put(stack)
        c = jax.block_until_ready(form_c(x))
        for label, fn, arg in ([(v, f, x) for v, f in variants] + [("eigh", eigh, c)]):
            start = time.perf_counter()
            compiled = fn.lower(arg).compile()
            compile_s[f"{name}/{label}"] = time.perf_counter() - start
            calls[f"{name}/{label}"] = (compiled, arg)
    a = jnp.asarray(np.random.default_rng(seed).standard_normal((2048, 4096), dtype=np.float32))
    gemm = jax.jit(lambda a: jnp.matmul(a, a.T, precision=jax.lax.Precision.HIGHEST)).lower(a).compile()
    calls["gemm"] = (gemm, a)
    best = {k: float("inf") for k in calls}
    outputs = {k: jax.block_until_ready(fn(arg)) for k, (fn, arg) in calls.items()}
    for _ in range(rounds):
        for key, (fn, arg) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(arg))
            best[key] = min(best[key], time.perf_counter() - start)
    rate = 2 * 2048 * 2048 * 4096 / best.pop("gemm")
    experts, shapes = PRESETS[preset]
    rows = []
    for (name, layers, m, n), _ in zip(shapes, groups):
        flops = minimal_flops(experts, m, n)
        floor = best[f"{name}/eigh"] + layers * sum(flops.values()) / rate
        rows.append({"group": name, "layers": layers, "m": m, "n": n, "swudi_s": best[f"{name}/swudi"],
                     "eigh_s": best[f"{name}/eigh"], "min_gflop": layers * sum(flops.values()) / 1e9,
                     "floor_s": floor, "over_floor": best[f"{name}/swudi"] / floor,
                     "compile_s": compile_s[f"{name}/swudi"]})
        if baseline:
            diff = outputs[f"{name}/swudi"] - outputs[f"{name}/before"]
            rows[-1]["max_abs_diff_before"] = float(jnp.max(jnp.abs(diff)))
            rows[-1]["before_s"] = best[f"{name}/before"]
            rows[-1]["after_over_before"] = best[f"{name}/swudi"] / best[f"{name}/before"]
    keys = ("swudi_s", "eigh_s", "floor_s", "min_gflop", "compile_s") + (("before_s",) if baseline else ())
    total = {k: sum(r[k] for r in rows) for k in keys}
    total["over_floor"] = total["swudi_s"] / total["floor_s"]
    if baseline:
        total["after_over_before"] = total["swudi_s"] / total["before_s"]
    return {"gemm_gflops": rate / 1e9, "groups": rows, "total": total, "swudi_jax": sj.__file__}


def format_table(result: dict) -> str:
    before = "before_s" in result["total"]
    extra_head = " before s | after / before |" if before else ""
    head = (f"measured matmul rate {result['gemm_gflops']:.0f} GFLOP/s\n\n"
            f"| group | layers |{extra_head} SWUDI s | eigh s | min. matmul GFLOP | floor s | × floor | compile s |\n"
            f"|---|---:|{'---:|---:|' if before else ''}---:|---:|---:|---:|---:|---:|")

    def row(label, layers, r):
        extra = f" {r['before_s']:.3f} | {r['after_over_before']:.2f} |" if before else ""
        return (f"| {label} | {layers} |{extra} {r['swudi_s']:.3f} | {r['eigh_s']:.3f} | {r['min_gflop']:.1f} | "
                f"{r['floor_s']:.3f} | {r['over_floor']:.2f} | {r['compile_s']:.2f} |")

    rows = [row(r["group"], r["layers"], r) for r in result["groups"]]
    rows.append(row("**total**", "", result["total"]))
    return "\n".join([head, *rows])


def spectral_at(rev: str):
    """``swudi_jax/maths/spectral.py`` (``swudi_jax/spectral.py`` before the move) as it was at
    git revision ``rev``, loaded as a separate module (its own imports — solvers, filters — come
    from this tree), for an in-process before/after."""
    import importlib.util
    import tempfile

    for path in ("swudi_jax/maths/spectral.py", "swudi_jax/spectral.py"):  # moved into maths/ later
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=str(ROOT), capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"git revision {rev} has neither swudi_jax/maths/spectral.py nor swudi_jax/spectral.py")
    source = shown.stdout
    with tempfile.NamedTemporaryFile("w", suffix=f"_spectral_{rev[:12]}.py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location(f"spectral_at_{rev[:12]}", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module


def with_min_block(block: int, fn):
    """``fn`` traced with :data:`swudi_jax.maths.gram.MIN_BLOCK` set to ``block`` (restored after)."""
    from swudi_jax.maths import gram

    def traced(*args):
        saved, gram.MIN_BLOCK = gram.MIN_BLOCK, block
        try:
            return fn(*args)
        finally:
            gram.MIN_BLOCK = saved

    return traced


def swudi_with(spectral_module):
    """SWUDI (t = 1300, r = 0.65, init "sum", solver as "auto" picks it) built on ``spectral_module``."""
    from swudi_jax.maths import filters
    from swudi_jax.methods.swudi import resolve_solver, swudi_filter

    h = swudi_filter(1300.0, 0.65)

    def one(tau):
        n_top = filters.rank_from_ratio(0.65, tau.shape[-1])
        solver = resolve_solver("auto", tau.shape, n_top)
        return spectral_module.filtered_merge(tau, lambda lam, shape: h(lam), "sum", solver, n_top)

    return one


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit_b32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (best kept)")
    p.add_argument("--seed", type=int, default=0)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--before", metavar="REV",
                       help="also time SWUDI on swudi_jax/maths/spectral.py (or the pre-move swudi_jax/spectral.py) "
                            "at git revision REV")
    which.add_argument("--min-block", type=int, metavar="B",
                       help="also time SWUDI with Gram column blocks of at least B (swudi_jax.maths.gram.MIN_BLOCK)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.min_block is not None and args.min_block < 1:
        p.error("--min-block must be >= 1")
    load = list(os.getloadavg())
    result = measure(args.preset, args.rounds, args.seed, args.before, args.min_block)
    payload = {"benchmark": "layer_floor", "preset": args.preset, "before": args.before,
               "before_min_block": args.min_block, "rounds": args.rounds,
               "load_average_start": load, "load_average_end": list(os.getloadavg()), "result": result}
    print(format_table(result))
    print(f"load average {load[0]:.1f} → {payload['load_average_end'][0]:.1f} on {os.cpu_count()} cores")
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
