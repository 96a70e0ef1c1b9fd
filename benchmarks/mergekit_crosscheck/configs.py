"""Whole mergekit configs: ``mergekit-yaml`` and ``swudi-merge`` on the same small Llama checkpoints.

Optional, not part of the tests (mergekit and torch live in their own venv, never the project's):

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit
    PYTHONPATH=. python benchmarks/mergekit_crosscheck/configs.py WORKDIR [/tmp/mkvenv/bin/mergekit-yaml] [NAME,...]

Writes tiny Llama checkpoints (``tests/mergekit_checkpoints.py``, with a config.json that
transformers and mergekit accept) under WORKDIR, runs each config through both tools and
prints, per config, the largest |difference| over all tensors relative to the largest |value|,
whether both wrote the same tensor names, and config.json's ``num_hidden_layers`` on each side.
The random methods (dare_*, della*) are left out: mergekit's torch draws cannot be reproduced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from mergekit_checkpoints import HIDDEN, INTER, LAYERS, VOCAB, family  # noqa: E402

from swudi_jax.checkpoint import io as ckio  # noqa: E402
from swudi_jax.checkpoint.pipeline import merge_checkpoints  # noqa: E402

T_ATTN, T_MLP = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]

CONFIGS = {
    "slerp": {"slices": [{"sources": [{"model": "base", "layer_range": [0, LAYERS]},
                                      {"model": "e0", "layer_range": [0, LAYERS]}]}],
              "merge_method": "slerp", "base_model": "base",
              "parameters": {"t": [{"filter": "self_attn", "value": T_ATTN}, {"filter": "mlp", "value": T_MLP},
                                   {"value": 0.5}]}},
    "task_arithmetic": {"models": [{"model": "base"}, {"model": "e0", "parameters": {"weight": 0.7}},
                                   {"model": "e1", "parameters": {"weight": [0.2, 0.6]}}],
                        "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.9}},
    "ties": {"models": [{"model": "e0", "parameters": {"density": 0.5, "weight": 0.5}},
                        {"model": "e1", "parameters": {"density": 0.3, "weight": 0.3}},
                        {"model": "e2", "parameters": {"density": 0.7, "weight": 0.2}}],
             "merge_method": "ties", "base_model": "base", "parameters": {"normalize": True, "int8_mask": True}},
    "breadcrumbs": {"models": [{"model": "e0", "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.05}},
                               {"model": "e1", "parameters": {"weight": 0.4, "density": 0.6, "gamma": 0.1}}],
                    "merge_method": "breadcrumbs", "base_model": "base"},
    "linear": {"models": [{"model": "e0", "parameters": {"weight": 1.0}}, {"model": "e1", "parameters": {"weight": 0.5}},
                          {"model": "e2", "parameters": {"weight": 0.25}}], "merge_method": "linear"},
    "model_stock": {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}], "merge_method": "model_stock",
                    "base_model": "base"},
    "karcher": {"models": [{"model": "e0"}, {"model": "e1"}], "merge_method": "karcher"},
    "sce": {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}], "merge_method": "sce",
            "base_model": "base", "parameters": {"select_topk": 0.7}},
    "nuslerp": {"models": [{"model": "e0", "parameters": {"weight": 0.3}}, {"model": "e1", "parameters": {"weight": 0.7}}],
                "merge_method": "nuslerp", "base_model": "base"},
    "ties_bf16": {"models": [{"model": "e0", "parameters": {"density": 0.5, "weight": 0.5}},
                             {"model": "e1", "parameters": {"density": 0.3, "weight": 0.3}}],
                  "merge_method": "ties", "base_model": "base", "dtype": "bfloat16"},
}


SCALE_OUT = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]


def _src(model: str, start: int, end: int, **parameters) -> dict:
    return {"model": model, "layer_range": [start, end], **({"parameters": parameters} if parameters else {})}


SLICES = {
    "passthrough_franken": {"slices": [{"sources": [_src("e0", 0, 2)]}, {"sources": [_src("e1", 1, 3)]}],
                            "merge_method": "passthrough"},
    "passthrough_solar_scale": {"slices": [{"sources": [_src("base", 0, 2)]},
                                           {"sources": [_src("base", 1, 3)], "parameters": {"scale": SCALE_OUT}}],
                                "merge_method": "passthrough"},
    # a per-model option's filter reads the source's name: e0's layer 1 is output layer 0
    "passthrough_source_scale": {"slices": [{"sources": [_src("e0", 1, 3, scale=[{"filter": "layers.1.", "value": 0.5},
                                                                                 {"value": 1.0}])]},
                                            {"sources": [_src("e1", 2, 3)]}],
                                 "merge_method": "passthrough"},
    "slerp_per_slice_t": {"slices": [{"sources": [_src("base", 0, 2), _src("e0", 0, 2)], "parameters": {"t": [0.1, 0.9]}},
                                     {"sources": [_src("base", 2, 3), _src("e0", 2, 3)], "parameters": {"t": [0.2, 0.6]}}],
                          "merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5}},
    "slerp_shifted_ranges": {"slices": [{"sources": [_src("base", 0, 2), _src("e0", 1, 3)]}],
                             "merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.3}},
    "task_arithmetic_shifted_filters": {
        "slices": [{"sources": [_src("base", 1, 3), _src("e0", 0, 2, weight=0.5),
                                _src("e1", 1, 3, weight=[{"filter": "layers.2.", "value": 0.1}, {"value": 0.8}])]}],
        "merge_method": "task_arithmetic", "base_model": "base",
        "parameters": {"lambda": [{"filter": "layers.1.", "value": 0.5}, {"value": 1.0}]}},
    "ties_modules_default_models": {
        "modules": {"default": {"models": [{"model": "e0", "parameters": {"weight": 0.3, "density": 0.5}},
                                           {"model": "e1", "parameters": {"weight": 0.6, "density": 0.7}}],
                                "parameters": {"lambda": 0.7}}},
        "merge_method": "ties", "base_model": "base"},
    "task_arithmetic_last_slice_zipped": {
        "slices": [{"sources": [_src("base", 0, 1), _src("e0", 0, 1)]},
                   {"sources": [_src("base", 1, 3), _src("e0", 1, 3), _src("e1", 1, 3)]}],
        "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"weight": 1.0}},
}
CONFIGS.update(SLICES)


def llama_config(folder: Path) -> None:
    content = json.loads((folder / "config.json").read_text())
    content.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
                    "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
                    "num_key_value_heads": 2, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False, "max_position_embeddings": 64})
    (folder / "config.json").write_text(json.dumps(content))


def absolute(value, root: Path):
    """The config with every model path absolute (mergekit reads a bare name as a Hub id)."""
    if isinstance(value, dict):
        return {k: (str(root / v) if k in ("model", "base_model") and isinstance(v, str) else absolute(v, root))
                for k, v in value.items()}
    if isinstance(value, list):
        return [absolute(v, root) for v in value]
    return value


def _layers(folder: Path):
    path = folder / "config.json"
    return json.loads(path.read_text()).get("num_hidden_layers") if path.is_file() else None


def main(workdir: str, mergekit_yaml: str = "/tmp/mkvenv/bin/mergekit-yaml", names: str | None = None) -> None:
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base").exists():
        family(root)
        for name in ("base", "e0", "e1", "e2"):
            llama_config(root / name)
    for name, config in CONFIGS.items():
        if names and name not in names.split(","):
            continue
        config = {"dtype": "float32", **config}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        ours, theirs = root / f"ours_{name}", root / f"mergekit_{name}"
        if not ours.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the base listed among the models: expected here
                merge_checkpoints(path, ours, progress=False)
        if not theirs.exists():
            mk_path = root / f"mergekit_{name}.yaml"
            mk_path.write_text(yaml.safe_dump(absolute(config, root), sort_keys=False))
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            run = subprocess.run([mergekit_yaml, str(mk_path), str(theirs), "--no-copy-tokenizer", "--allow-crimes"],
                                 cwd=root, capture_output=True, text=True, env=env)
            if run.returncode != 0:
                print(f"{name:18s} mergekit failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
        a, b = ckio.load(ours), ckio.load(theirs)
        worst, scale = 0.0, 0.0
        shared = [k for k in a if k in b]
        for key in shared:
            x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
            worst, scale = max(worst, float(np.max(np.abs(x - y)))), max(scale, float(np.max(np.abs(y))))
        same = sum(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in shared)
        print(f"{name:18s} max |ours - mergekit| = {worst:.3g} ({worst / scale:.2g} of max |value|); "
              f"{same}/{len(a)} tensors bit-identical; keys equal: {set(a) == set(b)}; "
              f"num_hidden_layers ours {_layers(ours)}, mergekit {_layers(theirs)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
