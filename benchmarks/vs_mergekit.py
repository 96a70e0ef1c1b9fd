"""``swudi-merge`` against ``mergekit-yaml`` on the same YAML: wall time, peak RSS, outputs compared.

Optional, not part of the tests (mergekit and torch live in their own venv, never the project's):

    python3 -m venv /work/mkvenv && /work/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    PYTHONPATH=. python -m benchmarks.vs_mergekit WORKDIR --mergekit-venv /work/mkvenv \\
        [--methods all | ties,linear] [--rounds 2] [--preset 53m | 1b]

Writes under WORKDIR (once) a Llama-shaped model in bfloat16 (``--preset 53m``: 53 M parameters,
hidden 768, intermediate 2048, 4 layers, vocab 16000; ``1b``: 1.26 B, hidden 2048, intermediate
5632, 22 layers, vocab 32000; untied head, HF names and a config.json that transformers accepts)
and 3 experts (base + N(0, 0.01²) per weight, rounded to bf16, so many task-vector entries share
a magnitude). Per method (every mergekit method by default), both tools run the same config
(absolute model paths), each in its own process, alternating swudi/mergekit for ``--rounds``
rounds; a process's wall time (imports included) and its peak resident set size
(:func:`benchmarks._measure.measured_process`) are recorded and the median is reported. The
last round's outputs are compared: max |ours − mergekit| and the share of entries more than one
bf16 ulp apart (distance of the ordered bit patterns; the random methods draw different masks).
Without ``--mergekit-venv`` only ``swudi-merge`` runs.

Prints a table and writes ``benchmarks/results/vs_mergekit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
import yaml

from benchmarks._measure import machine_info, measured_process, write_json
from swudi_jax.checkpoint import io as ckio

class Preset(NamedTuple):
    """A Llama shape: hidden and intermediate sizes, layers, vocabulary, attention heads."""

    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int


PRESETS = {"53m": Preset(768, 2048, 4, 16000, 12), "1b": Preset(2048, 5632, 22, 32000, 32)}
"""53 M parameters (the table's model); 1.26 B (TinyLlama-1.1B's sizes with full attention heads)."""
EXPERTS = ("e0", "e1", "e2")
RESULT = Path(__file__).resolve().parent / "results" / "vs_mergekit.json"


def shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names and torch (out, in) shapes of the benchmark model."""
    h, f = preset.hidden, preset.inter
    out = {"model.embed_tokens.weight": (preset.vocab, h)}
    for i in range(preset.layers):
        pre = f"model.layers.{i}"
        out.update({f"{pre}.self_attn.{n}.weight": (h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        out.update({f"{pre}.mlp.gate_proj.weight": (f, h), f"{pre}.mlp.up_proj.weight": (f, h),
                    f"{pre}.mlp.down_proj.weight": (h, f)})
        out.update({f"{pre}.input_layernorm.weight": (h,), f"{pre}.post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (preset.vocab, h)})
    return out


def llama_config(preset: Preset) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": preset.hidden,
            "intermediate_size": preset.inter, "num_hidden_layers": preset.layers,
            "num_attention_heads": preset.heads, "num_key_value_heads": preset.heads, "vocab_size": preset.vocab,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
            "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}


def write_fixture(root: Path, preset: Preset, seed: int = 0) -> None:
    """base and the experts as bf16 safetensors folders under ``root`` (skipped when present);
    tensor by tensor, so a 1 B model needs about two models of memory."""
    names = ("base",) + EXPERTS
    if all((root / name / "config.json").exists() for name in names):
        return
    rng = np.random.default_rng(seed)
    base = {k: (0.02 * rng.standard_normal(s, np.float32) if len(s) == 2 else 1 + 0.1 * rng.standard_normal(s, np.float32)
                ).astype(ml_dtypes.bfloat16) for k, s in shapes(preset).items()}
    for name in names:
        flat = base if name == "base" else {
            k: (v.astype(np.float32) + 0.01 * rng.standard_normal(v.shape, np.float32)).astype(ml_dtypes.bfloat16)
            for k, v in base.items()}
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        ckio.save(folder, flat)
        (folder / "config.json").write_text(json.dumps(llama_config(preset)))


def method_configs(root: Path, layers: int) -> dict[str, dict]:
    """One mergekit config per method, absolute model paths, bf16 throughout."""
    base, (e0, e1, e2) = str(root / "base"), (str(root / e) for e in EXPERTS)
    models = [e0, e1, e2]

    def family(method: str, per_model: dict, **params) -> dict:
        config = {"models": [{"model": m, "parameters": {"weight": w, **per_model}}
                             for m, w in zip(models, (0.5, 0.3, 0.2))],
                  "merge_method": method, "base_model": base, "dtype": "bfloat16"}
        if params:
            config["parameters"] = params
        return config

    def plain(method: str, names: list[str], with_base: bool = True, **params) -> dict:
        config = {"models": [{"model": m} for m in names], "merge_method": method, "dtype": "bfloat16"}
        if with_base:
            config["base_model"] = base
        if params:
            config["parameters"] = params
        return config

    weighted = [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, (0.5, 0.3, 0.2))]
    return {
        "linear": {"models": weighted, "merge_method": "linear", "dtype": "bfloat16"},
        "task_arithmetic": family("task_arithmetic", {}),
        "ties": family("ties", {"density": 0.5}),
        "dare_ties": family("dare_ties", {"density": 0.5}),
        "dare_linear": family("dare_linear", {"density": 0.5}),
        "breadcrumbs": family("breadcrumbs", {"density": 0.5, "gamma": 0.01}),
        "breadcrumbs_ties": family("breadcrumbs_ties", {"density": 0.5, "gamma": 0.01}),
        "della": family("della", {"density": 0.5, "epsilon": 0.1}),
        "della_linear": family("della_linear", {"density": 0.5, "epsilon": 0.1}),
        "sce": plain("sce", models, select_topk=0.5),
        "slerp": {"slices": [{"sources": [{"model": base, "layer_range": [0, layers]},
                                          {"model": e0, "layer_range": [0, layers]}]}],
                  "merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5}, "dtype": "bfloat16"},
        "nuslerp": {"models": weighted[:2], "merge_method": "nuslerp", "base_model": base, "dtype": "bfloat16"},
        "multislerp": {"models": weighted, "merge_method": "multislerp", "base_model": base, "dtype": "bfloat16"},
        "karcher": plain("karcher", models, with_base=False),
        "model_stock": plain("model_stock", models),
        "nearswap": plain("nearswap", [e0], t=0.001),
        "arcee_fusion": plain("arcee_fusion", [e0]),
        "ram": plain("ram", models),
        "ramplus_tl": plain("ramplus_tl", models),
        "passthrough": {"slices": [{"sources": [{"model": e0, "layer_range": [0, layers // 2]}]},
                                   {"sources": [{"model": e1, "layer_range": [layers // 2, layers]}]}],
                        "merge_method": "passthrough", "dtype": "bfloat16"},
    }


def timed_process(argv: list[str], env: dict | None = None) -> dict:
    """Run ``argv`` to completion; its wall time and peak RSS (:func:`benchmarks._measure.measured_process`)."""
    with tempfile.TemporaryFile() as err:
        usage = measured_process(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        text = err.read().decode(errors="replace")
    if usage["returncode"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{text[-3000:]}")
    return {"wall_s": usage["wall_s"], "peak_rss_bytes": usage["peak_rss_bytes"]}


def ordered_bits(x: np.ndarray) -> np.ndarray:
    """bf16 values as int64 that are consecutive for consecutive bf16 numbers (ulp distance)."""
    bits = np.asarray(x, ml_dtypes.bfloat16).view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, 0x8000 - bits, bits)


def compare(ours: Path, theirs: Path) -> dict:
    """max |ours − mergekit| over all tensors, and the share of entries > 1 bf16 ulp apart."""
    a, b = ckio.load(ours), ckio.load(theirs)
    if set(a) != set(b):
        return {"same_keys": False, "only_ours": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a))}
    worst, far, total, identical = 0.0, 0, 0, 0
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
        far += int(np.sum(np.abs(ordered_bits(x) - ordered_bits(y)) > 1))
        total += x.size
        identical += int(np.array_equal(ordered_bits(x), ordered_bits(y)))
    return {"same_keys": True, "max_abs_diff": worst, "share_over_1ulp": far / total,
            "tensors_identical": f"{identical}/{len(a)}"}


def commands(method: str, config: Path, root: Path, venv: str | None) -> dict[str, tuple[list[str], dict, Path]]:
    """Per tool, the command line, environment and output folder of one merge."""
    ours = root / f"swudi_{method}"
    runs = {"swudi-merge": ([sys.executable, "-m", "swudi_jax_cli", str(config), str(ours),
                             "--no-progress", "--no-copy-tokenizer"], dict(os.environ), ours)}
    if venv:
        theirs = root / f"mergekit_{method}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        runs["mergekit-yaml"] = ([str(Path(venv) / "bin" / "mergekit-yaml"), str(config), str(theirs),
                                  "--no-copy-tokenizer", "--allow-crimes"], env, theirs)
    return runs


def bench_method(method: str, config: dict, root: Path, venv: str | None, rounds: int) -> dict:
    """Alternating runs of both tools on one config; medians and the outputs compared."""
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    runs = commands(method, path, root, venv)
    samples: dict[str, list[dict]] = {tool: [] for tool in runs}
    for _ in range(rounds):
        for tool, (argv, env, out) in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            samples[tool].append(timed_process(argv, env))
    row = {"method": method, "rounds": rounds}
    for tool, runs_ in samples.items():
        row[tool] = {"wall_s": statistics.median(r["wall_s"] for r in runs_),
                     "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs_), "samples": runs_}
    if venv:
        mk, ours = row["mergekit-yaml"], row["swudi-merge"]
        row["time_ratio"] = ours["wall_s"] / mk["wall_s"]
        row["memory_ratio"] = ours["peak_rss_bytes"] / mk["peak_rss_bytes"]
        row["outputs"] = compare(root / f"swudi_{method}", root / f"mergekit_{method}")
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | mergekit-yaml s | swudi-merge s | time ratio | mergekit MiB | swudi MiB | memory ratio "
             "| max abs diff | entries > 1 ulp |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, mk = r["swudi-merge"], r.get("mergekit-yaml")
        out = r.get("outputs", {})
        cells = [r["method"], f"{mk['wall_s']:.1f}" if mk else "-", f"{ours['wall_s']:.1f}",
                 f"{r['time_ratio']:.2f}" if mk else "-", f"{mk['peak_rss_bytes'] / 2**20:.0f}" if mk else "-",
                 f"{ours['peak_rss_bytes'] / 2**20:.0f}", f"{r['memory_ratio']:.2f}" if mk else "-",
                 f"{out['max_abs_diff']:.3g}" if "max_abs_diff" in out else "-",
                 f"{100 * out['share_over_1ulp']:.3g}%" if "share_over_1ulp" in out else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--mergekit-venv", help="a venv holding mergekit (bin/mergekit-yaml); none: swudi only")
    parser.add_argument("--methods", default="all", help="comma-separated, or all (every mergekit method)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="53m",
                        help="model shape (one WORKDIR per preset: the fixture is written once)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    root = args.workdir.resolve()
    preset = PRESETS[args.preset]
    write_fixture(root, preset)
    configs = method_configs(root, preset.layers)
    methods = list(configs) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(configs)}")
    rows = []
    for method in methods:
        rows.append(bench_method(method, configs[method], root, args.mergekit_venv, args.rounds))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        write_json(args.out, {"machine": machine_info(), "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
