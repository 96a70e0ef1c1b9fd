"""swudi-merge as 1, 2 and 4 processes on one machine, and a 70B merge on N hosts projected.

Part 1 (measured). An 8-layer Llama-shaped checkpoint (HF names, (out, in) float32 weights:
q/o hidden², k/v kv×hidden, gate/up intermediate×hidden, down hidden×intermediate, embeddings,
norms, head) and ``--experts`` fine-tunes are written to a temporary folder; the same SWUDI config
is merged by ``swudi-merge`` as P processes (``--coordinator localhost:PORT --num-processes P
--process-id i``, gloo collectives on CPU; P = 1 runs the same command as one process) with the
persistent compile cache off, so every run compiles what it merges. For each P: the end-to-end wall
time (launch to the last exit: interpreter and JAX start, runtime start-up, planning, compiles,
merging, writing, publishing), the slowest process's merge loop (what ``swudi-merge`` prints), the
speed-ups over P = 1, each process's share of the estimated cost, and whether the output is byte for
byte P = 1's. ``--max-group-size`` defaults to about one down_proj layer per group, so that there
are groups enough for 4 processes; P = 1 runs with the same groups.

On a machine with fewer cores than processes the processes share the cores: the run then shows the
mechanism (the split, the balance, the byte-identical output, the overheads), not cluster speed.

Part 2 (projected, not measured). A Llama-70B-shaped merge (80 layers; q, o 8192×8192; k, v
1024×8192; gate, up 28672×8192; down 8192×28672) with ``--project-experts`` experts: each linear
layer's SWUDI time is an eigendecomposition scaled as n³ from one measured eigh (default: the
3072×3072 eigh of benchmarks/README.md "Layer floor", 1.244 s on this machine's 2 cores, idle) plus
the estimator's matmul flops (``layer_floor.minimal_flops``; the low-rank solver's R×R problem where
N·m < n) at a measured matmul rate (default 273 GFLOP/s, same table); reading the inputs at
``--read-gbps`` per host. Layers go to hosts as swudi-merge assigns groups (longest first to the
least-loaded host); a host's time is its layers' compute plus its reads. The largest single layer
bounds the time however many hosts there are.

    python -m benchmarks.multihost --repeats 2        # both parts (~3.5 min here)
    python -m benchmarks.multihost --quick            # tiny shapes, a smoke run (under a minute)
    python -m benchmarks.multihost --project-only --eigh-ref-s 0.9 --matmul-gflops 400   # other per-shape costs
"""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine_info, write_json  # noqa: E402
from layer_floor import minimal_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARE = re.compile(r"process (\d+) of (\d+) merged (\d+) of (\d+) tensor groups.* in ([\d.]+) s \((\d+)% of the estimated cost\)")
LLAMA_70B = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192), "o_proj": (8192, 8192),
             "gate_proj": (28672, 8192), "up_proj": (28672, 8192), "down_proj": (8192, 28672)}
"""(m, n) maths shapes of one Llama-70B decoder layer's linear weights (outputs, inputs)."""


def llama(rng: np.random.Generator, hidden: int, inter: int, kv: int, vocab: int, layers: int) -> dict[str, np.ndarray]:
    """A Llama-shaped flat checkpoint with HF names, (out, in) weights."""
    def w(*shape):
        return (rng.normal(size=shape) / math.sqrt(shape[-1])).astype(np.float32)

    flat = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32),
            "lm_head.weight": w(vocab, hidden)}
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    for i in range(layers):
        for name, shape in shapes.items():
            flat[f"model.layers.{i}.{name}.weight"] = w(*shape)
        flat[f"model.layers.{i}.input_layernorm.weight"] = np.ones(hidden, np.float32)
        flat[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    return flat


def write_models(root: Path, args) -> int:
    """base and the experts (base + a low-rank update + noise on every weight); returns the
    biggest tensor's bytes."""
    from swudi_jax.checkpoint import io as ckio

    rng = np.random.default_rng(0)
    base = llama(rng, args.hidden, args.intermediate, args.kv, args.vocab, args.layers)
    ckio.save(root / "base", base)
    for e in range(args.experts):
        expert = {k: (v + 0.02 * (rng.normal(size=(v.shape[0], 4)) @ rng.normal(size=(4, v.shape[1])) / 2
                                  + 0.005 * rng.normal(size=v.shape)) if v.ndim == 2 else v).astype(np.float32)
                  for k, v in base.items()}
        ckio.save(root / f"e{e}", expert)
    models = "\n".join(f"  - e{e}" for e in range(args.experts))
    (root / "merge.yaml").write_text(f"base_model: base\nmodels:\n{models}\nmerge_method: swudi\n")
    return max(v.nbytes for v in base.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_merge(root: Path, out: Path, processes: int, max_group: int, timeout: float, blas_threads: int) -> dict:
    """``swudi-merge`` as ``processes`` processes on this machine: wall time and each one's share.
    Every process of every run gets ``blas_threads`` BLAS threads (the eigh's LAPACK): its result
    depends on the thread count, and spinning BLAS threads of several processes on shared cores
    slow every eigh."""
    threads = str(blas_threads)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SWUDI_JAX_COMPILE_CACHE": "off", "OPENBLAS_NUM_THREADS": threads,
           "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    port = _free_port()
    command = [sys.executable, "-m", "swudi_jax_cli", str(root / "merge.yaml"), str(out), "--no-progress",
               "--max-group-size", str(max_group), "--coordinator", f"localhost:{port}",
               "--num-processes", str(processes)]
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    start = time.perf_counter()
    procs = [subprocess.Popen([*command, "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise RuntimeError(f"{processes} processes still running after {timeout} s") from None
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    shares = []
    for p, (_, err) in zip(procs, results):
        found = SHARE.search(err)
        if p.returncode != 0 or found is None:
            raise RuntimeError(f"a process exited with {p.returncode}:\n{err[-3000:]}")
        shares.append({"process": int(found[1]), "groups": int(found[3]), "of_groups": int(found[4]),
                       "merge_loop_s": float(found[5]), "cost_percent": int(found[6])})
    return {"processes": processes, "wall_s": wall, "slowest_merge_loop_s": max(s["merge_loop_s"] for s in shares),
            "cpu_s": cpu, "load_average_before": load, "shares": sorted(shares, key=lambda s: s["process"])}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def measure(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="multihost-") as tmp:
        root = Path(tmp)
        biggest = write_models(root, args)
        max_group = args.max_group_size or (args.experts + 2) * biggest
        for repeat in range(args.repeats):
            for processes in (args.processes if repeat % 2 == 0 else args.processes[::-1]):  # interleaved
                out = root / f"out{processes}_{repeat}"
                row = run_merge(root, out, processes, max_group, args.timeout, args.blas_threads)
                reference = root / f"out{args.processes[0]}_0"
                row["same_bytes_as_first"] = _tree(out) == _tree(reference)
                row.update(repeat=repeat, max_group_bytes=max_group)
                rows.append(row)
                print(f"  P={processes} repeat {repeat}: {row['wall_s']:.1f} s end to end, slowest merge loop "
                      f"{row['slowest_merge_loop_s']:.1f} s", flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Medians over repeats per process count, with the speed-ups over the first count."""
    table = []
    for p in sorted({r["processes"] for r in rows}):
        mine = [r for r in rows if r["processes"] == p]
        table.append({"processes": p, "wall_s": float(np.median([r["wall_s"] for r in mine])),
                      "merge_loop_s": float(np.median([r["slowest_merge_loop_s"] for r in mine])),
                      "cpu_s": float(np.median([r["cpu_s"] for r in mine])),
                      "groups": [s["groups"] for s in mine[0]["shares"]],
                      "cost_percent": [s["cost_percent"] for s in mine[0]["shares"]],
                      "same_bytes": all(r["same_bytes_as_first"] for r in mine)})
    for row in table:
        row["speedup_wall"] = table[0]["wall_s"] / row["wall_s"]
        row["speedup_merge_loop"] = table[0]["merge_loop_s"] / row["merge_loop_s"]
    return table


def layer_seconds(n_experts: int, m: int, n: int, eigh_ref_s: float, eigh_ref_n: int, gflops: float) -> float:
    """Projected SWUDI seconds of one (m, n) layer (see the module docstring)."""
    flops = minimal_flops(n_experts, m, n)
    matmuls = flops["c_and_d"] + flops["reconstruction"]
    size = n
    if n_experts * m < n:  # the low-rank solver: the R×R Gram of the weighted rows, R = N·m
        size = n_experts * m
        matmuls += 2 * size * size * n
    return eigh_ref_s * (size / eigh_ref_n) ** 3 + matmuls / (gflops * 1e9)


def project(args) -> dict:
    """A 70B merge on each host count of ``--project-hosts`` (see the module docstring)."""
    from swudi_jax.checkpoint.work_split import balance

    per_layer = {name: layer_seconds(args.project_experts, m, n, args.eigh_ref_s, args.eigh_ref_n, args.matmul_gflops)
                 for name, (m, n) in LLAMA_70B.items()}
    costs = [per_layer[name] for _ in range(80) for name in LLAMA_70B]
    read_bytes = {name: 2 * m * n * (args.project_experts + 1) for name, (m, n) in LLAMA_70B.items()}  # bf16 inputs
    reads = [read_bytes[name] / (args.read_gbps * 1e9) for _ in range(80) for name in LLAMA_70B]
    rows = []
    for hosts in args.project_hosts:
        owners = balance([c + r for c, r in zip(costs, reads)], hosts)
        loads = [sum(c + r for c, r, o in zip(costs, reads, owners) if o == h) for h in range(hosts)]
        rows.append({"hosts": hosts, "hours": max(loads) / 3600, "mean_hours": sum(loads) / hosts / 3600})
    return {"per_layer_s": per_layer, "total_hours_one_host": (sum(costs) + sum(reads)) / 3600,
            "largest_layer_s": max(c + r for c, r in zip(costs, reads)), "hosts": rows,
            "assumptions": {"experts": args.project_experts, "eigh_ref_s": args.eigh_ref_s,
                            "eigh_ref_n": args.eigh_ref_n, "matmul_gflops": args.matmul_gflops,
                            "read_gbps_per_host": args.read_gbps}}


def print_tables(table: list[dict], projection: dict) -> None:
    if table:
        print("\n| processes | end to end s | slowest merge loop s | speed-up (end to end) | speed-up (merge loop) "
              "| CPU s, all processes | groups per process | est. cost % per process | output = P=1's |")
        print("|---:|---:|---:|---:|---:|---:|---|---|:---:|")
        for r in table:
            print(f"| {r['processes']} | {r['wall_s']:.1f} | {r['merge_loop_s']:.1f} | {r['speedup_wall']:.2f}× | "
                  f"{r['speedup_merge_loop']:.2f}× | {r['cpu_s']:.0f} | {r['groups']} | {r['cost_percent']} | "
                  f"{'yes' if r['same_bytes'] else 'NO'} |")
    a = projection["assumptions"]
    print(f"\nProjected Llama-70B SWUDI merge, {a['experts']} experts (eigh {a['eigh_ref_s']} s at n = "
          f"{a['eigh_ref_n']}, scaled n³; matmuls at {a['matmul_gflops']} GFLOP/s; reads {a['read_gbps_per_host']} GB/s "
          "per host):\n")
    print("| layer | projected s |\n|---|---:|")
    for name, seconds in projection["per_layer_s"].items():
        print(f"| {name} {LLAMA_70B[name][0]}×{LLAMA_70B[name][1]} | {seconds:,.0f} |")
    print(f"\none host: {projection['total_hours_one_host']:.1f} h; no host count goes below the largest layer, "
          f"{projection['largest_layer_s'] / 60:.0f} min\n")
    print("| hosts | projected hours (busiest host) | mean per host |\n|---:|---:|---:|")
    for r in projection["hosts"]:
        print(f"| {r['hosts']} | {r['hours']:.2f} | {r['mean_hours']:.2f} |")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--kv", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--max-group-size", type=int, default=None, help="bytes (default: ~one down_proj per group)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="OPENBLAS_NUM_THREADS of every process (the same for every P: LAPACK's eigh rounds "
                             "differently with another thread count)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in seconds")
    parser.add_argument("--project-only", action="store_true", help="only the 70B projection")
    parser.add_argument("--project-experts", type=int, default=4)
    parser.add_argument("--project-hosts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--eigh-ref-s", type=float, default=1.244, help="seconds of one eigh at --eigh-ref-n")
    parser.add_argument("--eigh-ref-n", type=int, default=3072)
    parser.add_argument("--matmul-gflops", type=float, default=273.0)
    parser.add_argument("--read-gbps", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multihost.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.kv, args.vocab = 2, 16, 24, 8, 32
        args.processes = [p for p in args.processes if p <= 2]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    rows = [] if args.project_only else measure(args)
    table = summarize(rows) if rows else []
    projection = project(args)
    print_tables(table, projection)
    payload = {"machine": machine_info(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "runs": rows, "table": table, "projection": projection}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
