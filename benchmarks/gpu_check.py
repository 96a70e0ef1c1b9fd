"""The GPU check: parity, speed and memory of swudi_jax on one accelerator, against a plain
PyTorch transcription of SWUDI on the same device. Driven by ``benchmarks/gpu_check.sh``.

Sections (each in its own subprocess, so one failure, timeout or out-of-memory does not stop
the others and each section's peak device memory is its own; ``--in-process`` runs them here):

1. ``golden``: ``pytest tests/test_golden.py`` with JAX on the accelerator (parity with the
   SWUDI authors' PyTorch outputs).
2. ``vit``: a ViT-B/32-shaped 12-block model (q, k, v, o 768², fc1 3072×768, fc2 768×3072,
   biases, LayerNorms; HF names, (out, in) layout), 8 synthetic experts, merged by
   ``swudi_jax.merge(..., "swudi", layout="torch")``: first call (compile included), warm
   call (median of 3), XLA compile seconds (JAX's own compile events), peak device memory;
   the same merge by :func:`benchmarks.vs_torch.torch_merge` on the same device.
3. ``minilm``: MiniLM-L6-shaped stacks (6 layers: q, k, v, o 384², fc1 1536×384, fc2
   384×1536; 5 experts), one ``jax.jit(jax.vmap(swudi))`` call per shape group.
4. ``llm``: LLM-layer stacks (8 experts of 4096×4096 and 14336×4096, the LLM preset t = 300,
   r = 0.85), one ``swudi`` call per stack.

For every stack in 3 and 4: swudi_jax first/warm, the eigh floor (``jnp.linalg.eigh`` on the
same C, batched as the merge does), the torch transcription warm, ``torch.linalg.eigh`` on
the same C, and the relative difference of the two merged results. Host-to-device copies are
inside every timed call on both sides (the inputs start as NumPy arrays).

A time budget (``--budget``, default 330 s) is shared by the sections; a section that does
not fit in what is left is skipped and recorded as such. ``--quick`` runs tiny shapes in
seconds, ``--cpu`` forces JAX and torch onto the CPU (the smoke test runs both).

Writes ``gpu_check.json`` and ``gpu_check.md`` (the table) into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("golden", "vit", "minilm", "llm")
SECTION_SECONDS = {"golden": 150, "vit": 150, "minilm": 60, "llm": 150}
"""Time each section may take (its subprocess's timeout), capped by the budget left."""

FULL = {
    "vit": {"blocks": 12, "experts": 8, "hidden": 768, "mlp": 3072},
    "minilm": {"experts": 5, "groups": [("attn q,k,v,o", 24, 384, 384), ("mlp fc1", 6, 1536, 384),
                                        ("mlp fc2", 6, 384, 1536)]},
    "llm": {"experts": 8, "groups": [("attn 4096²", 1, 4096, 4096), ("mlp gate/up 14336×4096", 1, 14336, 4096)]},
}
QUICK = {
    "vit": {"blocks": 2, "experts": 3, "hidden": 16, "mlp": 48},
    "minilm": {"experts": 3, "groups": [("attn", 4, 12, 12), ("fc1", 1, 36, 12), ("fc2", 1, 12, 36)]},
    "llm": {"experts": 3, "groups": [("square", 1, 32, 32), ("tall", 1, 96, 32)]},
}
PRESET = {"vit": (1300.0, 0.65), "minilm": (1300.0, 0.65), "llm": (300.0, 0.85)}


# --------------------------------------------------------------------------- helpers


def _median_time(fn, repeats: int = 3) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _jax_env():
    """JAX with compile-time accounting: returns (jax, a dict that sums XLA compile seconds)."""
    import jax
    from jax._src import monitoring

    compile_s = {"backend_compile_s": 0.0, "compiles": 0}

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compile_s["backend_compile_s"] += duration
            compile_s["compiles"] += 1

    monitoring.register_event_duration_secs_listener(listen)
    return jax, compile_s


def _peak_bytes(jax) -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _torch_device(cpu: bool):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --------------------------------------------------------------------------- sections


def section_golden(args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_golden.py"],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=args.section_timeout)
    tail = (done.stdout + done.stderr).strip().splitlines()
    return {"passed": done.returncode == 0, "returncode": done.returncode, "summary": tail[-1] if tail else "",
            "wall_s": time.perf_counter() - start, "output_tail": "\n".join(tail[-30:])}


def vit_model(blocks: int, hidden: int, mlp: int, experts: int, seed: int):
    """A ViT-shaped base (HF names, (out, in)) and ``experts`` copies plus low-rank + noise deltas."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = {}
    for b in range(blocks):
        p = f"encoder.layers.{b}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}.self_attn.{name}.weight"] = (hidden, hidden)
            shapes[f"{p}.self_attn.{name}.bias"] = (hidden,)
        shapes.update({f"{p}.mlp.fc1.weight": (mlp, hidden), f"{p}.mlp.fc1.bias": (mlp,),
                       f"{p}.mlp.fc2.weight": (hidden, mlp), f"{p}.mlp.fc2.bias": (hidden,),
                       f"{p}.layer_norm1.weight": (hidden,), f"{p}.layer_norm1.bias": (hidden,),
                       f"{p}.layer_norm2.weight": (hidden,), f"{p}.layer_norm2.bias": (hidden,)})
    base = {k: (rng.standard_normal(s, dtype=np.float32) / np.float32(np.sqrt(s[-1]))) for k, s in shapes.items()}
    out = []
    for e in range(experts):
        r = np.random.default_rng([seed, e])
        expert = {}
        for k, w in base.items():
            if w.ndim == 2:
                left = r.standard_normal((w.shape[0], 16), dtype=np.float32)
                right = r.standard_normal((16, w.shape[1]), dtype=np.float32)
                delta = (left @ right) * np.float32(1e-3 / np.sqrt(16 * w.shape[1]))
                delta += r.standard_normal(w.shape, dtype=np.float32) * np.float32(1e-4 / np.sqrt(w.shape[1]))
            else:
                delta = r.standard_normal(w.shape, dtype=np.float32) * np.float32(1e-3)
            expert[k] = w + delta
        out.append(expert)
    return base, out


def section_vit(args) -> dict:
    import numpy as np

    jax, compile_s = _jax_env()
    import torch

    import swudi_jax as sj
    from benchmarks.vs_torch import torch_merge

    cfg = (QUICK if args.quick else FULL)["vit"]
    t, r = PRESET["vit"]
    base, experts = vit_model(cfg["blocks"], cfg["hidden"], cfg["mlp"], cfg["experts"], args.seed)

    def run_jax():
        return jax.block_until_ready(sj.merge(base, experts, "swudi", layout="torch", time=t, rank_ratio=r))

    start = time.perf_counter()
    got = run_jax()
    first = time.perf_counter() - start
    compiled = dict(compile_s)
    warm, warm_all = _median_time(run_jax)
    peak = _peak_bytes(jax)
    row = {"device": str(jax.devices()[0]), "params_per_model": int(sum(v.size for v in base.values())),
           "experts": cfg["experts"], "blocks": cfg["blocks"], "jax_first_s": first, "jax_warm_s": warm,
           "jax_warm_all_s": warm_all, "jax_compile_s": compiled["backend_compile_s"],
           "jax_compiles": compiled["compiles"], "jax_peak_device_bytes": peak}
    device = _torch_device(args.cpu)

    def run_torch():
        with torch.no_grad():
            tb = {k: torch.from_numpy(v).to(device) for k, v in base.items()}
            te = [{k: torch.from_numpy(v).to(device) for k, v in e.items()} for e in experts]
            out = torch_merge(tb, te, t, r)
            _sync(device)
            return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    want = run_torch()
    row["torch_first_s"] = time.perf_counter() - start
    row["torch_warm_s"], row["torch_warm_all_s"] = _median_time(run_torch)
    row["torch_device"] = str(device)
    row["torch_peak_device_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    row["max_rel_diff"] = max(_rel(got[k], want[k].cpu().numpy()) for k in base)
    row["warm_ratio"] = row["jax_warm_s"] / row["torch_warm_s"]
    del np
    return row


def _stack(rng, layers, experts, m, n):
    import numpy as np

    from benchmarks.layer_speed import synthetic_layer

    return np.stack([synthetic_layer(rng, experts, m, n, min(16, m, n), 0.1) for _ in range(layers)])


def section_stacks(args, name: str) -> dict:
    import numpy as np

    jax, compile_s = _jax_env()
    import jax.numpy as jnp
    import torch

    import swudi_jax as sj
    from benchmarks.vs_torch import torch_swudi

    cfg = (QUICK if args.quick else FULL)[name]
    t, r = PRESET[name]
    device = _torch_device(args.cpu)
    merge = jax.jit(jax.vmap(lambda x: sj.swudi(x, time=t, rank_ratio=r)))
    form_c = jax.jit(jax.vmap(lambda x: sj.interference_operator(x, sj.task_weights(x))))
    eigh = jax.jit(jax.vmap(jnp.linalg.eigh))
    rows = []
    for gi, (group, layers, m, n) in enumerate(cfg["groups"]):
        stack = _stack(np.random.default_rng([args.seed, gi]), layers, cfg["experts"], m, n)
        before = dict(compile_s)
        start = time.perf_counter()
        got = jax.block_until_ready(merge(stack))
        row = {"group": group, "layers": layers, "experts": cfg["experts"], "m": m, "n": n,
               "jax_first_s": time.perf_counter() - start,
               "jax_compile_s": compile_s["backend_compile_s"] - before["backend_compile_s"]}
        row["jax_warm_s"], _ = _median_time(lambda: jax.block_until_ready(merge(stack)))
        c = jax.block_until_ready(form_c(jnp.asarray(stack)))
        jax.block_until_ready(eigh(c))
        row["jax_eigh_floor_s"], _ = _median_time(lambda: jax.block_until_ready(eigh(c)))
        row["jax_peak_device_bytes"] = _peak_bytes(jax)

        def run_torch():
            with torch.no_grad():
                x = torch.from_numpy(stack).to(device)
                out = torch.stack([torch_swudi(x[i], t, r) for i in range(layers)])
                _sync(device)
                return out

        start = time.perf_counter()
        want = run_torch()
        row["torch_first_s"] = time.perf_counter() - start
        row["torch_warm_s"], _ = _median_time(run_torch)
        tc = torch.from_numpy(np.array(c)).to(device)
        torch.linalg.eigh(tc)
        _sync(device)
        row["torch_eigh_s"], _ = _median_time(lambda: (torch.linalg.eigh(tc), _sync(device)))
        row["max_rel_diff"] = _rel(got, want.cpu().numpy())
        row["warm_ratio"] = row["jax_warm_s"] / row["torch_warm_s"]
        row["over_eigh_floor"] = row["jax_warm_s"] / row["jax_eigh_floor_s"]
        rows.append(row)
        del got, want, c, tc, stack
    return {"device": str(jax.devices()[0]), "torch_device": str(device), "groups": rows}


def run_section(name: str, args) -> dict:
    if name == "golden":
        return section_golden(args)
    if name == "vit":
        return section_vit(args)
    return section_stacks(args, name)


# --------------------------------------------------------------------------- the driver


def _child(name: str, args, timeout: float) -> dict:
    argv = [sys.executable, "-m", "benchmarks.gpu_check", "--section", name, "--seed", str(args.seed)]
    argv += ["--quick"] if args.quick else []
    argv += ["--cpu"] if args.cpu else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # peaks are what is used, and torch fits beside
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
    try:
        done = subprocess.run(argv, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"status": "timeout", "timeout_s": timeout, "output_tail": str(exc.stdout or "")[-2000:]}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("@@SECTION@@")]
    if done.returncode != 0 or not lines:
        return {"status": "failed", "returncode": done.returncode, "output_tail": (done.stdout + done.stderr)[-3000:]}
    return json.loads(lines[-1][len("@@SECTION@@"):])


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:,.0f}"


def format_report(report: dict) -> str:
    s = report["sections"]
    lines = [f"# GPU check ({report['mode']}; {report.get('device', '?')}; {report['wall_s']:.0f} s)", ""]
    g = s.get("golden", {})
    lines.append(f"- golden parity (tests/test_golden.py): {g.get('status', 'not run')} {g.get('summary', '')}".rstrip())
    v = s.get("vit", {})
    if v.get("status") == "ok":
        lines += ["", f"ViT-B/32-shaped {v['blocks']}-block merge, {v['experts']} experts "
                  f"({v['params_per_model']:,} parameters per model):", "",
                  "| side | first call s | compile s | warm s | peak device MiB |", "|---|---:|---:|---:|---:|",
                  f"| swudi_jax.merge | {v['jax_first_s']:.2f} | {v['jax_compile_s']:.2f} ({v['jax_compiles']} "
                  f"programs) | {v['jax_warm_s']:.3f} | {_mib(v['jax_peak_device_bytes'])} |",
                  f"| torch transcription | {v['torch_first_s']:.2f} | – | {v['torch_warm_s']:.3f} | "
                  f"{_mib(v['torch_peak_device_bytes'])} |", "",
                  f"warm ratio swudi_jax / torch {v['warm_ratio']:.2f}; max rel. diff {v['max_rel_diff']:.1e}"]
    else:
        lines.append(f"- vit: {v.get('status', 'not run')} {v.get('error', '')}".rstrip())
    head = ("| stack | layers × (N, m, n) | jax first s | compile s | jax warm s | eigh floor s | × floor | "
            "torch warm s | torch eigh s | jax / torch | rel. diff |")
    for name in ("minilm", "llm"):
        sec = s.get(name, {})
        if sec.get("status") != "ok":
            lines.append(f"- {name}: {sec.get('status', 'not run')} {sec.get('error', '')}".rstrip())
            continue
        lines += ["", f"{name} stacks ({sec['device']}, torch on {sec['torch_device']}):", "", head,
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sec["groups"]:
            lines.append(f"| {r['group']} | {r['layers']} × ({r['experts']}, {r['m']}, {r['n']}) | "
                         f"{r['jax_first_s']:.2f} | {r['jax_compile_s']:.2f} | {r['jax_warm_s']:.3f} | "
                         f"{r['jax_eigh_floor_s']:.3f} | {r['over_eigh_floor']:.2f} | {r['torch_warm_s']:.3f} | "
                         f"{r['torch_eigh_s']:.3f} | {r['warm_ratio']:.2f} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes: seconds")
    p.add_argument("--cpu", action="store_true", help="JAX and torch on the CPU (the fallback the smoke test runs)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all sections together")
    p.add_argument("--in-process", action="store_true", help="run the sections in this process (no isolation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where gpu_check.json/.md go (default $OUT, else benchmarks/results)")
    p.add_argument("--section", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = sorted(set(args.sections) - set(SECTIONS))
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    if args.out_dir is None:
        args.out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    args.section_timeout = 150.0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.section:  # a worker: one section, its result on a marked line
        try:
            result = {"status": "ok", **run_section(args.section, args)}
        except Exception as exc:  # noqa: BLE001 - reported in the JSON, the driver goes on
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print("@@SECTION@@" + json.dumps(result), flush=True)
        return result
    started = time.perf_counter()
    report = {"benchmark": "gpu_check", "mode": ("quick" if args.quick else "full") + (", cpu" if args.cpu else ""),
              "argv": sys.argv[1:] if argv is None else list(argv), "sections": {}}
    for name in args.sections:
        left = args.budget - (time.perf_counter() - started)
        timeout = min(SECTION_SECONDS[name], left)
        if timeout < 10:
            report["sections"][name] = {"status": "skipped (time budget)"}
            continue
        print(f"gpu_check: {name} (up to {timeout:.0f} s)", flush=True)
        if args.in_process and name != "golden":
            try:
                result = {"status": "ok", **run_section(name, args)}
            except Exception as exc:  # noqa: BLE001
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        elif name == "golden":
            args.section_timeout = timeout
            try:
                result = section_golden(args)
                result["status"] = "passed" if result["passed"] else "FAILED"
            except subprocess.TimeoutExpired:
                result = {"status": "timeout", "timeout_s": timeout}
        else:
            result = _child(name, args, timeout)
        report["sections"][name] = result
        print(f"  {name}: {result.get('status')} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
    report["device"] = next((s.get("device") for s in report["sections"].values() if s.get("device")), None)
    report["wall_s"] = time.perf_counter() - started
    table = format_report(report)
    print("\n" + table, flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out_dir / "gpu_check.md").write_text(table + "\n")
    print(f"wrote {args.out_dir / 'gpu_check.json'} and gpu_check.md", flush=True)
    return report


if __name__ == "__main__":
    main()
