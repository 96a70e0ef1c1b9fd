"""swudi-merge on LoRA adapters: the factor path against the densified path, time and peak memory.

A synthetic Llama-7B decoder layer (q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008,
two norms; float32, HF naming) and 8 PEFT adapters of rank 16 on all seven projections
(random factors, ``lora_alpha`` 32). Each side is one ``swudi-merge`` run (swudi, the paper's
defaults) in its own process; its peak resident memory is the child's ``ru_maxrss``:

- ``factor``: the adapters over the base: every projection merges from the factors
  (:mod:`swudi_jax.checkpoint.lora_factors`, the 128 × 128 problem per weight);
- ``densified``: the same adapters over a hard link of the base's weights in another folder
  (``copy+./adapter``): a model other than ``base_model``, so each expert is densified
  (base + ΔW, 7 × 8 dense m × n deltas) and merged by the dense path (n × n ``eigh`` of C:
  4096 for six weights, 11008 for down_proj) — what swudi-merge did before the factor path.

Also an ``adapter`` run: the factor path written as one PEFT adapter (``out_format: peft``).
Prints a table (wall seconds of the whole process and of ``merge_checkpoints`` — reading,
compiling, merging, writing — peak RSS) and the largest
relative difference of the merged task vectors between the two sides) and writes JSON.

    python -m benchmarks.lora_merge                 # the table in benchmarks/README.md (~30 min on 2 shared cores)
    python -m benchmarks.lora_merge --quick         # tiny shapes, seconds (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._measure import emit_result, machine_info, run_worker, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "lora_merge.json"
FULL = {"hidden": 4096, "mlp": 11008, "experts": 8, "rank": 16}
QUICK = {"hidden": 64, "mlp": 96, "experts": 3, "rank": 4}
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


def layer_shapes(hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    shapes = {p: (hidden, hidden) for p in PROJ[:4]}
    shapes.update({"mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)})
    return {f"model.layers.0.{p}": s for p, s in shapes.items()}


def write_inputs(work: Path, cfg: dict) -> None:
    """The base layer, a hard link of its weights in ``copy/``, and the adapters."""
    from swudi_jax.checkpoint import io as ckio

    rng = np.random.default_rng(0)
    shapes = layer_shapes(cfg["hidden"], cfg["mlp"])
    base = {f"{m}.weight": (rng.standard_normal(s, np.float32) / np.sqrt(s[1])).astype(np.float32)
            for m, s in shapes.items()}
    for name in ("input_layernorm", "post_attention_layernorm"):
        base[f"model.layers.0.{name}.weight"] = np.ones(cfg["hidden"], np.float32)
    ckio.save(work / "base", base)
    (work / "copy").mkdir()
    for f in (work / "base").iterdir():
        os.link(f, work / "copy" / f.name)
    r = cfg["rank"]
    for i in range(cfg["experts"]):
        tensors = {}
        for m, (out_dim, in_dim) in shapes.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = rng.standard_normal((r, in_dim), np.float32) / np.sqrt(in_dim)
            tensors[f"base_model.model.{m}.lora_B.weight"] = 0.02 * rng.standard_normal((out_dim, r), np.float32)
        folder = work / f"lora{i}"
        folder.mkdir()
        ckio.save(folder / "adapter_model.safetensors", tensors)
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [p.split(".")[-1] for p in PROJ]}))


def config_for(work: Path, side: str, n: int) -> Path:
    over = "copy+" if side == "densified" else ""
    config = {"base_model": "base", "models": [f"{over}lora{i}" for i in range(n)], "merge_method": "swudi"}
    if side == "adapter":
        config["out_format"] = "peft"
    path = work / f"{side}.yaml"
    path.write_text(json.dumps(config))
    return path


def worker(spec: str) -> None:
    """One job in this process (the parent holds no arrays, so its pages never count in a child's
    peak RSS): "inputs" writes the checkpoints, "merge" runs swudi-merge and prints the seconds of
    ``merge_checkpoints``, "diff" compares the two sides' outputs."""
    args = json.loads(spec)
    if args["job"] == "inputs":
        write_inputs(Path(args["work"]), args["cfg"])
        emit_result({})
    elif args["job"] == "machine":
        emit_result({"machine": machine_info()})
    elif args["job"] == "diff":
        emit_result({"diff": task_vector_diff(Path(args["work"]))})
    else:
        from swudi_jax.checkpoint.pipeline import merge_checkpoints

        start = time.perf_counter()
        merge_checkpoints(args["config"], args["out"], progress=False)
        emit_result({"merge_s": time.perf_counter() - start})


def task_vector_diff(work: Path) -> float:
    from swudi_jax.checkpoint import io as ckio

    base, fast, slow = (ckio.load(work / d) for d in ("base", "factor_out", "densified_out"))
    return max(float(np.linalg.norm(fast[k] - slow[k]) / max(np.linalg.norm(slow[k] - base[k]), 1e-30))
               for k in base if k.endswith("proj.weight"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--sides", default="factor,adapter,densified")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    cfg = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="lora_merge_"))
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SWUDI_JAX_COMPILE_CACHE": "off"}

    def job(**spec):
        return run_worker([sys.executable, "-m", "benchmarks.lora_merge", "--worker", json.dumps(spec)],
                          cwd=str(ROOT), env=env)

    try:
        job(job="inputs", work=str(work), cfg=cfg)
        for side in args.sides.split(","):
            result = job(job="merge", config=str(config_for(work, side, cfg["experts"])), out=str(work / f"{side}_out"))
            rows.append({"side": side, **result})
            print(f"| {side} | {result['process_s']:.1f} | {result['merge_s']:.1f} | "
                  f"{result['peak_rss_bytes'] / 2**30:.2f} |", flush=True)
        diff = job(job="diff", work=str(work))["diff"] if {"factor", "densified"} <= {r["side"] for r in rows} else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload = {"quick": args.quick, "sizes": cfg, "results": rows, "max_rel_task_vector_diff": diff,
               "machine": job(job="machine")["machine"]}
    print("\n| side | process (s) | merge_checkpoints (s) | peak RSS (GiB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['process_s']:.1f} | {r['merge_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
    if diff is not None:
        print(f"\nlargest relative difference of the merged task vectors, factor vs densified: {diff:.1e}")
    write_json(args.out, payload)
    print(f"JSON: {args.out}")
    return payload


if __name__ == "__main__":
    main()
