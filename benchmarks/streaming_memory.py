"""Peak memory of `swudi-merge` on a multi-file checkpoint: bounded by the tensor group, not by N × the model.

Writes a synthetic HF-layout model (torch (out, in) weights, bf16 or fp32) as a sharded
safetensors directory, plus N experts, then measures peak resident memory (``ru_maxrss`` of
each child process, from ``os.wait4``) of:

- ``runtime``: a process that only imports swudi_jax and runs one tiny merge (the JAX runtime floor);
- ``stream/<G>``: ``swudi-merge`` with ``--max-group-size G`` (one group of tensors from all
  N + 2 models in memory at a time), for a few values of G;
- ``in-memory``: loading every checkpoint whole and calling ``swudi_jax.merge`` (what a
  non-streaming merger holds: N + 1 models and the result).

All runs use the same data and method, side by side in one invocation. Prints a table and
writes JSON (default ``benchmarks/results/streaming_memory.json``).

    python benchmarks/streaming_memory.py                # 4 experts x ~200 MB, swudi
    python benchmarks/streaming_memory.py --smoke        # tiny, seconds
    python benchmarks/streaming_memory.py --split --model-mb 200 --group-mb 96 --no-in-memory \
        --json benchmarks/results/streaming_split.json   # read / compute floors vs the overlapped pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: python benchmarks/...
from _measure import measured_process, write_json  # noqa: E402

MB = 1 << 20


def model_shapes(hidden: int, layers: int) -> dict[str, tuple[int, ...]]:
    """A Llama-like decoder: attention q/k/v/o (h×h), MLP up/gate (2h×h) and down (h×2h), norms, head."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (4 * hidden, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (2 * hidden, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (2 * hidden, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, 2 * hidden)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (4 * hidden, hidden)
    return shapes


def layers_for(target_mb: float, hidden: int, itemsize: int) -> int:
    per_layer = (4 + 6) * hidden * hidden * itemsize
    fixed = 8 * hidden * hidden * itemsize
    return max(1, int(round((target_mb * MB - fixed) / per_layer)))


def write_models(root: Path, shapes: dict, n_experts: int, dtype, shard_bytes: int, seed: int = 0) -> list[Path]:
    """Base + experts as sharded safetensors directories, written tensor by tensor (bounded memory)."""
    from swudi_jax.checkpoint.io.safetensors_io import SafetensorsWriter

    entries = {k: (s, np.dtype(dtype)) for k, s in shapes.items()}
    paths = [root / "base"] + [root / f"expert{i}" for i in range(n_experts)]
    writers = [SafetensorsWriter(p, entries, shard_size=shard_bytes) for p in paths]
    rng = np.random.default_rng(seed)
    for key, shape in shapes.items():
        base = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])
        writers[0].write(key, base.astype(dtype))
        for w in writers[1:]:
            delta = rng.standard_normal(shape, dtype=np.float32) * (0.01 / np.sqrt(shape[-1]))
            w.write(key, (base + delta).astype(dtype))
    for w in writers:
        w.close()
    (paths[0] / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": shapes["model.norm.weight"][0]}))
    return paths


IN_MEMORY = (
    "import sys, numpy as np, swudi_jax\n"
    "from swudi_jax.checkpoint import io\n"
    "base, *experts = [io.load(p) for p in sys.argv[3:]]\n"
    "merged = swudi_jax.merge(base, experts, sys.argv[1], layout='torch', max_group_bytes=int(sys.argv[2]))\n"
    "io.save(sys.argv[3] + '_merged_in_memory', {k: np.asarray(v) for k, v in merged.items()}, force=True)\n"
)

RUNTIME = (
    "import numpy as np, swudi_jax, sys\n"
    "b = {'w': np.ones((8, 8), np.float32)}\n"
    "swudi_jax.merge(b, [{'w': b['w'] + 1}, {'w': b['w'] * 2}], sys.argv[1], layout='torch')\n"
)


SPLIT = r"""
import json, sys, time
t0 = time.perf_counter()
mode, config_path, out, cap, result = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
import swudi_jax
report = {"mode": mode, "import_s": time.perf_counter() - t0}
start, cpu, timings = time.perf_counter(), time.process_time(), {}
swudi_jax.merge_checkpoints(config_path, out, progress=False, max_group_bytes=cap, overlap=mode == "overlapped",
                            timings=timings)
report.update(timings)
report["total_s"] = time.perf_counter() - start
report["cpu_s"] = time.process_time() - cpu
open(result, "w").write(json.dumps(report))
"""


def split(config: Path, work: Path, cap: int, env: dict, runs: int = 1) -> dict:
    """The time split in one invocation: ``merge_checkpoints`` overlapped and sequential
    (``overlap=False``), each in a fresh process on the same files (page cache warm: they were
    just written), with the merge loop's busy seconds per stage (its ``timings``). The sequential
    run's read and compute busy times are the floors: its stages never overlap, so each is what
    that stage costs alone (reading with the finite check and the cast; merging from memory,
    compilation included)."""
    rows: dict = {}
    for _ in range(runs):  # the modes interleaved, so that a drifting load hits them alike; best of the runs
        for mode in ("overlapped", "sequential"):
            out, result = work / f"split_{mode}", work / f"split_{mode}.json"
            shutil.rmtree(out, ignore_errors=True)
            rss, wall = measure([sys.executable, "-c", SPLIT, mode, str(config), str(out), str(cap), str(result)], env)
            row = json.loads(result.read_text()) | {"peak_rss_bytes": rss, "process_wall_s": wall}
            shutil.rmtree(out, ignore_errors=True)
            if mode not in rows or row["total_s"] < rows[mode]["total_s"]:
                rows[mode] = row
    rows["read_floor_s"], rows["compute_floor_s"] = rows["sequential"]["read_s"], rows["sequential"]["compute_s"]
    floor = max(rows["read_floor_s"], rows["compute_floor_s"])
    rows["ratio_overlapped"] = rows["overlapped"]["wall_s"] / floor
    rows["ratio_sequential"] = rows["sequential"]["wall_s"] / floor
    return rows


def print_split(rows: dict) -> None:
    print(f"\ntime split (--split), group cap {rows['cap_mb']:g} MB, load average before {rows['load_before']}, "
          f"after {rows['load_after']}:\n")
    print("| run | wall (s) | read busy (s) | compute busy (s) | write busy (s) | process CPU (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("overlapped", "sequential"):
        r = rows[mode]
        print(f"| {mode} | {r['wall_s']:.1f} | {r['read_s']:.1f} | {r['compute_s']:.1f} | {r['write_s']:.1f} | "
              f"{r['cpu_s']:.1f} | {r['peak_rss_bytes'] / MB:.0f} |")
    print(f"\nfloors (the sequential run's busy seconds): read {rows['read_floor_s']:.1f}, compute "
          f"{rows['compute_floor_s']:.1f}; wall / max(read floor, compute floor): overlapped "
          f"{rows['ratio_overlapped']:.2f}, sequential {rows['ratio_sequential']:.2f} (the loop's wall; process start "
          f"and imports excluded: imports {rows['overlapped']['import_s']:.1f} s)")


def measure(command: list[str], env: dict) -> tuple[int, float]:
    """Run ``command``; its peak RSS in bytes (``ru_maxrss`` from wait4, under a fresh launcher:
    :func:`_measure.measured_process`) and wall seconds."""
    with tempfile.TemporaryFile() as err:
        usage = measured_process(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        if usage["returncode"] != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({usage['returncode']}):\n"
                               f"{err.read().decode(errors='replace')[-2000:]}")
    return usage["peak_rss_bytes"], usage["wall_s"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--model-mb", type=float, default=200.0, help="approximate size of one model")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--shard-mb", type=float, default=50.0, help="input and output shard size")
    parser.add_argument("--group-mb", type=float, nargs="+", default=[48.0, 192.0],
                        help="--max-group-size values for the streamed runs (bytes over all N + 2 models)")
    parser.add_argument("--method", default="swudi")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "streaming_memory.json")
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory comparison run")
    parser.add_argument("--split", action="store_true",
                        help="time split instead of memory: merge_checkpoints overlapped and sequential, their "
                             "stages' busy times (the sequential run's read and compute are the floors), at the "
                             "first --group-mb (writes --json)")
    parser.add_argument("--runs", type=int, default=1, help="--split: best of this many runs per row")
    args = parser.parse_args(argv)
    if args.smoke:
        args.experts, args.model_mb, args.hidden, args.shard_mb, args.group_mb = 2, 0.05, 32, 0.02, [0.02]

    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(args.dtype)
    layers = layers_for(args.model_mb, args.hidden, dtype.itemsize)
    shapes = model_shapes(args.hidden, layers)
    model_bytes = sum(int(np.prod(s)) for s in shapes.values()) * dtype.itemsize
    work = Path(tempfile.mkdtemp(prefix="swudi_stream_")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    try:
        paths = write_models(work, shapes, args.experts, dtype, int(args.shard_mb * MB))
        config = work / "merge.yaml"
        config.write_text(
            f"base_model: {paths[0]}\nmodels: [{', '.join(str(p) for p in paths[1:])}]\n"
            f"merge_method: {args.method}\nout_shard_size: {int(args.shard_mb * MB)}\n"
        )
        if args.split:
            cap = int(args.group_mb[0] * MB)
            load_before = os.getloadavg()[0]
            rows = split(config, work, cap, env, args.runs)
            rows.update(cap_mb=args.group_mb[0], load_before=round(load_before, 1), load_after=round(os.getloadavg()[0], 1))
            result = {"method": args.method, "experts": args.experts, "dtype": args.dtype, "hidden": args.hidden,
                      "layers": layers, "tensors": len(shapes), "model_bytes": model_bytes, "smoke": args.smoke,
                      "cpu_count": os.cpu_count(), "split": rows}
            print(f"\nstreaming split: {args.method}, {args.experts} experts x {model_bytes / MB:.1f} MB "
                  f"({len(shapes)} tensors, {args.dtype})")
            print_split(rows)
            write_json(args.json, result)
            print(f"wrote {args.json}")
            return result
        rows = []
        rss, wall = measure([sys.executable, "-c", RUNTIME, args.method], env)
        rows.append({"run": "runtime", "group_bytes": 0, "peak_rss_bytes": rss, "wall_s": wall})
        from swudi_jax.checkpoint.pipeline import plan_checkpoints

        for group_mb in args.group_mb:
            cap = int(group_mb * MB)
            plan = plan_checkpoints(config, max_group_bytes=cap)
            out = work / f"out_{group_mb:g}"
            command = [sys.executable, "-m", "swudi_jax.checkpoint.cli", str(config), str(out), "--no-progress",
                       "--max-group-size", str(cap)]
            rss, wall = measure(command, env)
            held = plan.largest_group_bytes() * (args.experts + 2)
            rows.append({"run": f"stream/{group_mb:g}MB", "group_bytes": held, "peak_rss_bytes": rss, "wall_s": wall,
                         "groups": len(plan.groups)})
            shutil.rmtree(out, ignore_errors=True)
        if not args.no_in_memory:
            cap = int(args.group_mb[-1] * MB)
            rss, wall = measure([sys.executable, "-c", IN_MEMORY, args.method, str(cap), *map(str, paths)], env)
            rows.append({"run": "in-memory", "group_bytes": (args.experts + 2) * model_bytes, "peak_rss_bytes": rss,
                         "wall_s": wall})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    runtime = rows[0]["peak_rss_bytes"]
    for row in rows:
        row["above_runtime_bytes"] = row["peak_rss_bytes"] - runtime
    result = {
        "method": args.method, "experts": args.experts, "dtype": args.dtype, "hidden": args.hidden, "layers": layers,
        "tensors": len(shapes), "model_bytes": model_bytes, "n_times_model_bytes": args.experts * model_bytes,
        "all_models_bytes": (args.experts + 1) * model_bytes, "smoke": args.smoke, "rows": rows,
    }
    print(f"\nstreaming memory: {args.method}, {args.experts} experts x {model_bytes / MB:.1f} MB "
          f"({len(shapes)} tensors, {args.dtype}); N x model = {args.experts * model_bytes / MB:.1f} MB, "
          f"base + N experts = {(args.experts + 1) * model_bytes / MB:.1f} MB\n")
    header = f"| {'run':<16} | {'held at once (MB)':>17} | {'peak RSS (MB)':>13} | {'above runtime (MB)':>18} | {'wall (s)':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(f"| {row['run']:<16} | {row['group_bytes'] / MB:>17.1f} | {row['peak_rss_bytes'] / MB:>13.1f} | "
              f"{row['above_runtime_bytes'] / MB:>18.1f} | {row['wall_s']:>8.1f} |")
    print("\nheld at once: (N + 2) x the largest group's tensor bytes (streamed), or (N + 2) x the model (in memory)")
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
