"""``swudi-merge`` against ``mergekit-yaml`` on the same YAML: wall time, peak RSS, outputs compared.

Optional, not part of the tests (mergekit and torch live in their own venv, never the project's):

    python3 -m venv /work/mkvenv && /work/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    PYTHONPATH=. python -m benchmarks.vs_mergekit WORKDIR --mergekit-venv /work/mkvenv \\
        [--methods ties,linear] [--rounds 2]

Writes under WORKDIR (once) a 53 M-parameter Llama-shaped model in bfloat16 (hidden 768,
intermediate 2048, 4 layers, vocab 16000, untied head; HF names and a config.json that
transformers accepts) and 3 experts (base + N(0, 0.01²) per weight, rounded to bf16, so
many task-vector entries share a magnitude). Per method, both tools run the same config
(absolute model paths), each in its own process, alternating swudi/mergekit for ``--rounds``
rounds; a process's wall time (imports included) and its peak resident set size (``os.wait4``'s
``ru_maxrss`` of that child) are recorded and the median is reported. The last round's outputs
are compared: max |ours − mergekit| and the share of entries more than one bf16 ulp apart
(distance of the ordered bit patterns). Without ``--mergekit-venv`` only ``swudi-merge`` runs.

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
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml

from benchmarks._measure import machine_info, write_json
from swudi_jax.checkpoint import io as ckio

HIDDEN, INTER, LAYERS, VOCAB, HEADS = 768, 2048, 4, 16000, 12
EXPERTS = ("e0", "e1", "e2")
RESULT = Path(__file__).resolve().parent / "results" / "vs_mergekit.json"


def shapes() -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names and torch (out, in) shapes of the benchmark model."""
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        pre = f"model.layers.{i}"
        out.update({f"{pre}.self_attn.{n}.weight": (HIDDEN, HIDDEN) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        out.update({f"{pre}.mlp.gate_proj.weight": (INTER, HIDDEN), f"{pre}.mlp.up_proj.weight": (INTER, HIDDEN),
                    f"{pre}.mlp.down_proj.weight": (HIDDEN, INTER)})
        out.update({f"{pre}.input_layernorm.weight": (HIDDEN,), f"{pre}.post_attention_layernorm.weight": (HIDDEN,)})
    out.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return out


def llama_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}


def write_fixture(root: Path, seed: int = 0) -> None:
    """base and the experts as bf16 safetensors folders under ``root`` (skipped when present)."""
    names = ("base",) + EXPERTS
    if all((root / name / "config.json").exists() for name in names):
        return
    rng = np.random.default_rng(seed)
    base = {k: (0.02 * rng.standard_normal(s, np.float32) if len(s) == 2 else 1 + 0.1 * rng.standard_normal(s, np.float32))
            for k, s in shapes().items()}
    for name in names:
        flat = base if name == "base" else {k: v + 0.01 * rng.standard_normal(v.shape, np.float32)
                                            for k, v in base.items()}
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        ckio.save(folder, {k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()})
        (folder / "config.json").write_text(json.dumps(llama_config()))


def method_configs(root: Path) -> dict[str, dict]:
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

    return {
        "linear": {"models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, (0.5, 0.3, 0.2))],
                   "merge_method": "linear", "dtype": "bfloat16"},
        "task_arithmetic": family("task_arithmetic", {}),
        "ties": family("ties", {"density": 0.5}),
        "dare_ties": family("dare_ties", {"density": 0.5}),
        "breadcrumbs_ties": family("breadcrumbs_ties", {"density": 0.5, "gamma": 0.01}),
        "della": family("della", {"density": 0.5, "epsilon": 0.1}),
        "sce": {"models": [{"model": m} for m in models], "merge_method": "sce", "base_model": base,
                "parameters": {"select_topk": 0.5}, "dtype": "bfloat16"},
        "slerp": {"slices": [{"sources": [{"model": base, "layer_range": [0, LAYERS]},
                                          {"model": e0, "layer_range": [0, LAYERS]}]}],
                  "merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5}, "dtype": "bfloat16"},
        "model_stock": {"models": [{"model": m} for m in models], "merge_method": "model_stock", "base_model": base,
                        "dtype": "bfloat16"},
    }
