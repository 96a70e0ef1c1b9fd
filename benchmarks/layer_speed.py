"""Speed and peak memory of the closed forms against iterative WUDI, on a ViT-B/32-shaped stack.

The stack: 12 transformer blocks, each with q, k, v, o (768×768), fc1 (m=3072, n=768) and
fc2 (m=768, n=3072) in maths layout, and 8 synthetic experts per layer (low rank plus noise,
fixed seed). Layers of one shape form one group — q, k, v, o of B blocks are one stack of
4·B layers — and each group is merged in ONE compiled call, ``jax.jit(jax.vmap(method))``.

Methods, side by side in one run, each in its own subprocess (so its peak RSS is its own):

- ``swudi``, ``swudi_a``, ``pinv``: the closed forms (one eigh per layer);
- ``wudi_reference``: WUDI, Adam(1e-5) for 300 steps, gradient of the original loss by
  autodiff (``wudi_gd(gradient="reference")``);
- ``wudi_gram``: the same Adam run on the gradient 2(θC − D) (``gradient="gram"``);
- ``eigh_floor``: scipy's LAPACK ``eigh(driver="evd")`` on the same C matrices, float32: no
  closed form can beat one eigendecomposition per layer;
- ``jax_eigh``: ``jax.vmap(jnp.linalg.eigh)`` on the same C matrices (what the engine calls).

Times exclude compilation (ahead-of-time compile, timed and reported apart, then a warm-up
call) and are medians of repeats. ``--blocks`` sets how many blocks the comparison runs on
(the iterative baselines are slow: 1 block by default) and ratios are per block; the closed
forms and the floor also run on the whole ``--stack-blocks`` stack. ``--reference-steps K``
times the reference form at K and 2K steps and extrapolates linearly to ``--wudi-steps``.
``--blas-threads 1`` pins OpenBLAS (the LAPACK behind both scipy's and jax's eigh) to one
thread: on an oversubscribed machine its two spinning threads make an eigh 4-6× slower.

    python -m benchmarks.layer_speed                       # 1-block comparison + 12-block stack
    python -m benchmarks.layer_speed --tiny                # seconds: tiny shapes, 5 WUDI steps

Prints a table and writes JSON (default ``benchmarks/results/layer_speed.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks import _measure

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "layer_speed.json"


class Group(NamedTuple):
    """Layers of one shape in a block: ``per_block`` layers of m outputs × n inputs."""

    name: str
    per_block: int
    m: int
    n: int


VIT_B32 = (Group("attn q,k,v,o", 4, 768, 768), Group("mlp fc1", 1, 3072, 768), Group("mlp fc2", 1, 768, 3072))
TINY = (Group("attn q,k,v,o", 4, 16, 16), Group("mlp fc1", 1, 48, 16), Group("mlp fc2", 1, 16, 48))
PRESETS = {"vit_b32": VIT_B32, "tiny": TINY}

CLOSED_FORMS = ("swudi", "swudi_a", "pinv")
ITERATIVE = ("wudi_gram", "wudi_reference")
FLOORS = ("eigh_floor", "jax_eigh")
METHODS = FLOORS + CLOSED_FORMS + ITERATIVE
LABELS = {
    "eigh_floor": "floor: scipy eigh (evd)",
    "jax_eigh": "jax.numpy.linalg.eigh",
    "swudi": "SWUDI (t=1300, r=0.65)",
    "swudi_a": "SWUDI-A (participation_sqrt)",
    "pinv": "pinv (D C+)",
    "wudi_gram": "WUDI Adam, Gram form",
    "wudi_reference": "WUDI Adam, reference form",
}


# ------------------------------------------------------------------------------- the inputs


def synthetic_layer(rng: np.random.Generator, n_experts: int, m: int, n: int, rank: int, noise: float) -> np.ndarray:
    """Task vectors (N, m, n) like fine-tuning deltas: rank-``rank`` signal plus dense noise."""
    out = np.empty((n_experts, m, n), np.float32)
    for i in range(n_experts):
        left = rng.standard_normal((m, rank), dtype=np.float32)
        right = rng.standard_normal((rank, n), dtype=np.float32) / np.float32(np.sqrt(rank * n))
        out[i] = left @ right
        out[i] += rng.standard_normal((m, n), dtype=np.float32) * np.float32(noise / np.sqrt(n))
    return out


def synthetic_group(group_index: int, group: Group, blocks: int, *, n_experts: int, seed: int,
                    rank: int = 16, noise: float = 0.1) -> np.ndarray:
    """The stacked task vectors (blocks·per_block, N, m, n) of one group, float32.

    Each layer has its own generator seeded by (seed, block, group, layer), so block b holds
    the same data whatever the number of blocks asked for.
    """
    out = np.empty((blocks * group.per_block, n_experts, group.m, group.n), np.float32)
    for b in range(blocks):
        for j in range(group.per_block):
            rng = np.random.default_rng([seed, b, group_index, j])
            out[b * group.per_block + j] = synthetic_layer(rng, n_experts, group.m, group.n,
                                                           min(rank, group.m, group.n), noise)
    return out


# ------------------------------------------------------------------------------- the worker


def _merge_fn(method: str, steps: int):
    """The one-layer function of ``method``, to be vmapped over a group's layers."""
    import swudi_jax as sj

    if method == "swudi":
        return sj.swudi
    if method == "swudi_a":
        return sj.swudi_a
    if method == "pinv":
        return sj.pinv_merge
    if method == "wudi_gram":
        return functools.partial(sj.wudi_gd, steps=steps, gradient="gram")
    if method == "wudi_reference":
        return functools.partial(sj.wudi_gd, steps=steps, gradient="reference")
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def _time_groups(method: str, steps: int, inputs: list, repeats: int, warmup: int) -> dict:
    """Compile one ``jit(vmap(method))`` per group, then time each group's call."""
    import jax

    merge = jax.jit(jax.vmap(_merge_fn(method, steps)))
    compiled = [_measure.compile_timed(merge, x) for x in inputs]
    calls = [(functools.partial(fn, x), seconds) for (fn, seconds), x in zip(compiled, inputs)]
    return _time_calls(calls, repeats, warmup)


def _time_calls(calls: list, repeats: int, warmup: int) -> dict:
    """Time each group's ready-to-run call; the peak-RSS mark is restarted first so that
    ``run_peak_rss_bytes`` covers the calls only (compilation and inputs excluded)."""
    _measure.reset_peak_rss()
    groups = []
    for run, seconds in calls:
        timing = _measure.time_calls(run, repeats=repeats, warmup=warmup)
        groups.append({"compile_s": seconds, "times_s": timing.times, "median_s": timing.median})
    return {"compile_s": sum(g["compile_s"] for g in groups), "groups": groups,
            "time_s": sum(g["median_s"] for g in groups), "run_peak_rss_bytes": _measure.peak_rss_since_reset_bytes()}


def _time_floor(method: str, inputs: list, repeats: int, warmup: int) -> dict:
    """One eigh per layer on the C matrices of the same inputs (C is formed untimed)."""
    import jax
    import jax.numpy as jnp
    import scipy.linalg

    import swudi_jax as sj

    form_c = jax.jit(jax.vmap(lambda t: sj.interference_operator(t, sj.task_weights(t))))
    calls = []
    for x in inputs:
        c = jax.block_until_ready(form_c(x))
        if method == "eigh_floor":
            host = np.asarray(c)

            def run(host=host):
                return [scipy.linalg.eigh(layer, driver="evd", check_finite=False) for layer in host]

            calls.append((run, 0.0))
        else:
            run, seconds = _measure.compile_timed(jax.jit(jax.vmap(jnp.linalg.eigh)), c)
            calls.append((functools.partial(run, c), seconds))
    return _time_calls(calls, repeats, warmup)


def worker(spec: dict) -> dict:
    """Build the inputs of ``spec["blocks"]`` blocks and time one method on them."""
    import jax

    groups = PRESETS[spec["preset"]]
    inputs = [jax.device_put(synthetic_group(i, g, spec["blocks"], n_experts=spec["experts"], seed=spec["seed"]))
              for i, g in enumerate(groups)]
    jax.block_until_ready(inputs)
    baseline = _measure.peak_rss_bytes()
    method, repeats, warmup = spec["method"], spec["repeats"], spec["warmup"]
    if method in FLOORS:
        result = _time_floor(method, inputs, repeats, warmup)
    elif method == "wudi_reference" and spec["reference_steps"] < spec["steps"]:
        result = _extrapolated(inputs, spec["reference_steps"], spec["steps"], repeats, warmup)
    else:
        result = _time_groups(method, spec["steps"] if method in ITERATIVE else 0, inputs, repeats, warmup)
    result["baseline_rss_bytes"] = baseline
    result["blas"] = _measure.blas_info()
    return result


def _extrapolated(inputs: list, k: int, steps: int, repeats: int, warmup: int) -> dict:
    """The reference form timed at k and 2k steps; time(steps) = fixed + steps · per-step."""
    short = _time_groups("wudi_reference", k, inputs, repeats, warmup)
    long = _time_groups("wudi_reference", 2 * k, inputs, repeats, warmup)
    per_step = (long["time_s"] - short["time_s"]) / k
    fixed = short["time_s"] - k * per_step
    rule = "linear: fixed + steps·(T(2k) − T(k))/k"
    if per_step <= 0 or fixed < 0:  # noise swamped the difference: fall back to proportional
        per_step, fixed, rule = long["time_s"] / (2 * k), 0.0, "proportional: steps·T(2k)/2k"
    return {
        "compile_s": short["compile_s"],
        "groups": short["groups"],
        "time_s": fixed + steps * per_step,
        "run_peak_rss_bytes": max((r["run_peak_rss_bytes"] for r in (short, long) if r["run_peak_rss_bytes"]),
                                  default=None),
        "extrapolated": {"measured_steps": [k, 2 * k], "measured_time_s": [short["time_s"], long["time_s"]],
                         "per_step_s": per_step, "fixed_s": fixed, "rule": rule, "long_groups": long["groups"]},
    }


# ------------------------------------------------------------------------------- the driver


def run_method(method: str, blocks: int, args: argparse.Namespace) -> dict:
    """One method on ``blocks`` blocks in its own subprocess; its result with peak RSS."""
    spec = {"method": method, "blocks": blocks, "preset": args.preset, "experts": args.experts,
            "seed": args.seed, "steps": args.wudi_steps, "reference_steps": args.reference_steps,
            "repeats": args.repeats, "warmup": args.warmup}
    argv = [sys.executable, "-m", "benchmarks.layer_speed", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if args.blas_threads:
        env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    result = _measure.run_worker(argv, cwd=str(ROOT), env=env)
    result.update(method=method, blocks=blocks, per_block_s=result["time_s"] / blocks)
    print(f"  {LABELS[method]:<30} {blocks:>2} block(s): {result['time_s']:9.3f} s"
          f"  (compile {result['compile_s']:.1f} s, peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB)",
          flush=True)
    return result


def combine_rounds(results: list[dict]) -> dict:
    """One method's rounds as one result: median times, the largest peak RSS, every round kept."""
    peak = max(results, key=lambda r: r["peak_rss_bytes"])
    out = dict(peak)
    out["time_s"] = statistics.median(r["time_s"] for r in results)
    out["per_block_s"] = statistics.median(r["per_block_s"] for r in results)
    out["compile_s"] = statistics.median(r["compile_s"] for r in results)
    out["rounds"] = [{k: r.get(k) for k in ("time_s", "compile_s", "peak_rss_bytes", "baseline_rss_bytes",
                                            "run_peak_rss_bytes", "groups")} for r in results]
    return out


def run_rounds(methods: list[str], blocks: int, args: argparse.Namespace) -> dict:
    """``--rounds`` passes over ``methods``, each method in its own subprocess every time; the
    order reverses on every other pass so that a drifting machine load is shared out."""
    results: dict[str, list] = {m: [] for m in methods}
    for i in range(args.rounds):
        if args.rounds > 1:
            print(f" round {i + 1}/{args.rounds}", flush=True)
        for method in (methods if i % 2 == 0 else methods[::-1]):
            results[method].append(run_method(method, blocks, args))
    return {m: combine_rounds(results[m]) for m in methods}


def ratios(runs: dict) -> dict:
    """The target ratios, per block, from runs measured side by side on the same blocks."""
    def per_block(name):
        return runs[name]["per_block_s"] if name in runs else None

    def rss(name):
        return runs[name]["peak_rss_bytes"] if name in runs else None

    def run_rss(name):
        return runs[name].get("run_peak_rss_bytes") if name in runs else None

    swudi = per_block("swudi")
    out = {}
    if swudi:
        pairs = {
            "speedup_vs_wudi_reference": (per_block("wudi_reference"), swudi, 100.0, ">="),
            "speedup_vs_wudi_gram": (per_block("wudi_gram"), swudi, 5.0, ">="),
            "swudi_over_eigh_floor": (swudi, per_block("eigh_floor"), 1.3, "<="),
            "swudi_over_jax_eigh": (swudi, per_block("jax_eigh"), None, None),
            "peak_rss_swudi_over_wudi_reference": (rss("swudi"), rss("wudi_reference"), 0.5, "<="),
            "timed_calls_peak_rss_swudi_over_wudi_reference": (run_rss("swudi"), run_rss("wudi_reference"), 0.5, "<="),
        }
        for key, (num, den, target, sense) in pairs.items():
            if num is None or den is None:
                continue
            value = num / den
            met = None if target is None else (value >= target if sense == ">=" else value <= target)
            out[key] = {"value": value, "target": None if target is None else f"{sense} {target:g}", "met": met}
    return out


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:,.0f}"


def _seconds(x: float) -> str:
    return f"{x:,.2f}" if x >= 10 else f"{x:.3g}"


def format_table(runs: dict, blocks: int) -> str:
    """Markdown table of one set of runs (same blocks), with times relative to SWUDI."""
    swudi = runs.get("swudi", {}).get("per_block_s")
    head = ("| method | blocks | compile s | time s | s / block | × SWUDI | peak RSS MiB | RSS over inputs MiB "
            "| peak of the timed calls MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in METHODS:
        if name not in runs:
            continue
        r = runs[name]
        note = " (extrapolated)" if "extrapolated" in r else ""
        rel = f"{r['per_block_s'] / swudi:,.2f}" if swudi else "–"
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] else "–"
        rows.append(f"| {LABELS[name]}{note} | {blocks} | {compile_s} | {_seconds(r['time_s'])} | "
                    f"{_seconds(r['per_block_s'])} | {rel} | {r['peak_rss_bytes'] / 2**20:,.0f} | "
                    f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / 2**20:,.0f} | {_mib(r.get('run_peak_rss_bytes'))} |")
    return "\n".join([head, *rows])


def format_ratios(rat: dict) -> str:
    lines = ["| ratio (per block, side by side) | value | target | met |", "|---|---:|---:|:---:|"]
    for key, r in rat.items():
        met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {key} | {r['value']:,.2f} | {r['target'] or '–'} | {met} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=None,
                   help="blocks every method runs on side by side, ratios per block (default 1; tiny 1)")
    p.add_argument("--stack-blocks", type=int, default=None,
                   help="blocks the closed forms and floors also run on; 0 skips (default 12; tiny 0)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wudi-steps", type=int, default=None, help="Adam steps of WUDI (default 300; tiny 5)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="time the reference form at K and 2K steps and extrapolate to --wudi-steps "
                        "(default: run all steps; tiny 2)")
    p.add_argument("--blas-threads", type=int, default=0,
                   help="OPENBLAS_NUM_THREADS for the workers (scipy's and jax's LAPACK); 0 leaves it as is. "
                        "On a shared, oversubscribed machine 1 avoids OpenBLAS's spinning threads")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method and round (after --warmup)")
    p.add_argument("--rounds", type=int, default=1,
                   help="passes over all methods, order reversed every other pass; medians across passes")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1 block, 5 WUDI steps (a smoke run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.preset = "tiny" if args.tiny else "vit_b32"
    defaults = {"blocks": 1, "stack_blocks": 0 if args.tiny else 12, "wudi_steps": 5 if args.tiny else 300}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reference_steps is None:
        args.reference_steps = 2 if args.tiny else args.wudi_steps
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    for name in ("blocks", "experts", "wudi_steps", "reference_steps", "repeats", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.stack_blocks < 0 or args.warmup < 0 or args.blas_threads < 0:
        p.error("--stack-blocks, --warmup and --blas-threads must be >= 0")
    return args


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically: a temporary file next to ``path``, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        _measure.emit_result(worker(json.loads(args.worker)))
        return {}
    groups = PRESETS[args.preset]
    started = time.time()
    machine = _measure.machine_info()
    print(f"layer_speed: {args.preset} stack, {args.experts} experts, groups "
          + ", ".join(f"{g.name} {g.per_block}×({g.m}×{g.n})" for g in groups), flush=True)
    print(f"side by side on {args.blocks} block(s):", flush=True)
    subset = run_rounds(args.methods, args.blocks, args)
    stack = {}
    if args.stack_blocks and args.stack_blocks != args.blocks:
        print(f"closed forms and floors on the {args.stack_blocks}-block stack:", flush=True)
        stack = run_rounds([m for m in args.methods if m not in ITERATIVE], args.stack_blocks, args)
    rat = ratios(subset)
    text = [f"\n### {args.blocks} block(s), every method\n", format_table(subset, args.blocks)]
    if stack:
        text += [f"\n### {args.stack_blocks}-block stack, closed forms\n", format_table(stack, args.stack_blocks)]
    if rat:
        text += ["\n### ratios\n", format_ratios(rat)]
    print("\n".join(text), flush=True)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": "layer_speed",
        "command": "python -m benchmarks.layer_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "groups": [g._asdict() for g in groups],
        "machine": machine,
        "wall_s": time.time() - started,
        "runs": {"blocks": args.blocks, "methods": subset},
        "stack": {"blocks": args.stack_blocks, "methods": stack},
        "ratios": rat,
    }
    write_json(args.out, payload)
    print(f"\nwrote {args.out}", flush=True)
    return payload


if __name__ == "__main__":
    main()
