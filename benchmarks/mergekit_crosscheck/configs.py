"""Whole mergekit configs: ``mergekit-yaml`` and ``swudi-merge`` on the same small Llama checkpoints.

Optional, not part of the tests (mergekit and torch live in their own venv, never the project's):

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit
    PYTHONPATH=. python benchmarks/mergekit_crosscheck/configs.py WORKDIR [/tmp/mkvenv/bin/mergekit-yaml] [NAME,...]

Writes tiny Llama checkpoints (``tests/mergekit_checkpoints.py``, with a config.json that
transformers and mergekit accept; the base and two experts with three different fast
tokenizers, ``tests/tokenizer_files.py``) under WORKDIR, runs each config through both tools
and prints one row per config: the largest |difference| over all tensors relative to the
largest |value|, the tensors bit-identical, whether both wrote the same tensor names,
config.json's ``num_hidden_layers`` on each side, and for half-precision merges the entries
within one unit in the last place of mergekit's value. Each config runs in float32 and with
``dtype: bfloat16``; the "stored" rows omit ``dtype`` on bf16 checkpoints (mergekit then
computes in bf16). Tensors with a vocabulary axis are compared token by token (the output
tokenizers must hold the same tokens with the same flags). NAME,... runs only those configs
(without the ``_float32`` suffix). The random methods (dare_*, della*) are left out:
mergekit's torch draws cannot be reproduced. Writes ``benchmarks/results/mergekit_configs.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from mergekit_checkpoints import HIDDEN, INTER, LAYERS, VOCAB, family  # noqa: E402
from tokenizer_files import write_three  # noqa: E402

from swudi_jax.checkpoint import io as ckio  # noqa: E402
from swudi_jax.checkpoint.pipeline import merge_checkpoints  # noqa: E402
from swudi_jax.checkpoint.vocab_rows import VOCAB_TENSORS  # noqa: E402

T_ATTN, T_MLP = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
TWO = [{"model": "e0", "parameters": {"weight": 0.6}}, {"model": "e1", "parameters": {"weight": 0.4}}]

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
    "breadcrumbs_ties": {"models": [{"model": "e0", "parameters": {"weight": 0.6, "density": 0.7, "gamma": 0.05}},
                                    {"model": "e1", "parameters": {"weight": 0.4, "density": 0.5, "gamma": 0.1}}],
                         "merge_method": "breadcrumbs_ties", "base_model": "base"},
    "linear": {"models": [{"model": "e0", "parameters": {"weight": 1.0}}, {"model": "e1", "parameters": {"weight": 0.5}},
                          {"model": "e2", "parameters": {"weight": 0.25}}], "merge_method": "linear"},
    "model_stock": {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}], "merge_method": "model_stock",
                    "base_model": "base"},
    "karcher": {"models": [{"model": "e0"}, {"model": "e1"}], "merge_method": "karcher"},
    "sce": {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}], "merge_method": "sce",
            "base_model": "base", "parameters": {"select_topk": 0.7}},
    "nuslerp": {"models": [{"model": "e0", "parameters": {"weight": 0.3}}, {"model": "e1", "parameters": {"weight": 0.7}}],
                "merge_method": "nuslerp", "base_model": "base"},
    "nuslerp_rows": {"models": [{"model": "e0", "parameters": {"weight": 0.3}},
                                {"model": "e1", "parameters": {"weight": 0.9}}],
                     "merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False}},
    "multislerp": {"models": [{"model": "e0", "parameters": {"weight": 0.5}}, {"model": "e1", "parameters": {"weight": 0.3}},
                              {"model": "e2", "parameters": {"weight": 0.2}}],
                   "merge_method": "multislerp", "base_model": "base"},
    "nearswap": {"models": [{"model": "e0"}], "merge_method": "nearswap", "base_model": "base",
                 "parameters": {"t": 0.05}},
    "ram": {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}], "merge_method": "ram", "base_model": "base",
            "parameters": {"epsilon": 0.05}},
    "ramplus_tl": {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}], "merge_method": "ramplus_tl",
                   "base_model": "base", "parameters": {"epsilon": 0.05, "r": 0.5, "alpha": 0.3}},
    "arcee_fusion": {"models": [{"model": "e0"}], "merge_method": "arcee_fusion", "base_model": "base"},
    # tokenizers: the base and e0, e1 have three different vocabularies (tests/tokenizer_files.py)
    "union_task_arithmetic": {"models": TWO, "merge_method": "task_arithmetic", "base_model": "base",
                              "tokenizer_source": "union"},
    "union_ties_tokens": {"models": [{"model": "e0", "parameters": {"weight": 0.5, "density": 0.6}},
                                     {"model": "e1", "parameters": {"weight": 0.3, "density": 0.5}}],
                          "merge_method": "ties", "base_model": "base",
                          "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                              "ce": {"source": {"kind": "zero"}},
                              "ab": {"source": {"kind": "model_token", "model": "e0", "token": "cd"}, "force": True},
                              "<new>": {"source": {"kind": "model_token", "model": "e1", "token_id": 3}},
                              "<|im_start|>": {"source": "e1", "force": True}}}},
    "union_linear": {"models": TWO + [{"model": "base", "parameters": {"weight": 0.2}}], "merge_method": "linear",
                     "base_model": "base", "tokenizer_source": "union"},
    "base_tokenizer_slerp": {"models": [{"model": "e1"}], "merge_method": "slerp", "base_model": "base",
                             "parameters": {"t": 0.4}, "tokenizer_source": "base"},
    "e1_tokenizer_karcher": {"models": [{"model": "e0"}, {"model": "e1"}], "merge_method": "karcher",
                             "tokenizer_source": "e1"},
}
STORED = ("ties", "breadcrumbs", "task_arithmetic", "nuslerp", "karcher", "union_ties_tokens")
"""Configs also run with ``dtype`` omitted on bf16 checkpoints."""


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
        return {k: (str(root / v) if k in ("model", "base_model", "tokenizer_source", "source")
                    and isinstance(v, str) and (root / v).is_dir() else absolute(v, root))
                for k, v in value.items()}
    if isinstance(value, list):
        return [absolute(v, root) for v in value]
    return value


def checkpoints(root: Path, dtype=np.float32) -> None:
    if (root / "base").exists():
        return
    family(root, dtype=dtype)
    for name in ("base", "e0", "e1", "e2"):
        llama_config(root / name)
    write_three(root)


def token_rows(folder: Path) -> dict[str, int]:
    content = json.loads((folder / "tokenizer.json").read_text())
    ids = dict(content["model"]["vocab"])
    ids.update({e["content"]: e["id"] for e in content["added_tokens"]})
    return ids


def _layers(folder: Path):
    path = folder / "config.json"
    return json.loads(path.read_text()).get("num_hidden_layers") if path.is_file() else None


def compare(ours: Path, theirs: Path, half: bool) -> dict:
    """Our output against mergekit's: tensors (vocabulary rows by token), tokens and their flags."""
    a, b = ckio.load(ours), ckio.load(theirs)
    row = {"keys_equal": set(a) == set(b), "num_hidden_layers": [_layers(ours), _layers(theirs)]}
    if (theirs / "tokenizer.json").exists() and (ours / "tokenizer.json").exists():
        ta, tb = token_rows(ours), token_rows(theirs)
        flags = [{k: v for k, v in e.items() if k != "id"}
                 for e in json.loads((theirs / "tokenizer.json").read_text())["added_tokens"]]
        ours_flags = [{k: v for k, v in e.items() if k != "id"}
                      for e in json.loads((ours / "tokenizer.json").read_text())["added_tokens"]]
        row["tokens_equal"] = set(ta) == set(tb) and sorted(map(str, flags)) == sorted(map(str, ours_flags))
        row["vocab_size"] = [json.loads((d / "config.json").read_text())["vocab_size"] for d in (ours, theirs)]
    worst, scale, same, close, total = 0.0, 0.0, 0, 0, 0
    shared = [k for k in a if k in b]
    for key in shared:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        y = y.astype(x.dtype)  # mergekit returns float32 for ramplus_tl/arcee_fusion: rounded when written here
        if key in VOCAB_TENSORS and "tokens_equal" in row and x.shape[0] == y.shape[0]:
            tokens = sorted(ta)
            x = np.concatenate([x[[ta[t] for t in tokens]], x[len(ta):]])
            y = np.concatenate([y[[tb[t] for t in tokens]], y[len(tb):]])
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        worst, scale = max(worst, float(np.max(np.abs(x64 - y64)))), max(scale, float(np.max(np.abs(y64))))
        same += int(np.array_equal(x, y))
        if half:
            exp = np.floor(np.log2(np.maximum(np.abs(y64), np.finfo(np.float32).tiny)))
            close += int(np.sum(np.abs(x64 - y64) <= np.exp2(exp - 7)))
            total += y.size
    row.update({"max_abs": worst, "rel": worst / scale, "identical": f"{same}/{len(a)}",
                "within_1ulp": close / total if half else None})
    return row


def run_pair(root: Path, name: str, config: dict, mergekit_yaml: str) -> dict:
    ours, theirs = root / f"ours_{name}", root / f"mergekit_{name}"
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if not ours.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the base listed among the models: expected here
            merge_checkpoints(path, ours, progress=False)
    if not theirs.exists():
        mk_path = root / f"mergekit_{name}.yaml"
        mk_path.write_text(yaml.safe_dump(absolute(config, root), sort_keys=False))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run([mergekit_yaml, str(mk_path), str(theirs), "--no-copy-tokenizer", "--allow-crimes"],
                              cwd=root, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1:]}
    return compare(ours, theirs, config.get("dtype") != "float32")


def main(workdir: str, mergekit_yaml: str = "/tmp/mkvenv/bin/mergekit-yaml", names: str | None = None) -> list[dict]:
    root = Path(workdir)
    checkpoints(root / "f32")
    checkpoints(root / "bf16", ml_dtypes.bfloat16)
    rows = []
    runs = [(f"{n}_{d}", root / "f32", {**c, "dtype": d}) for n, c in CONFIGS.items() for d in ("float32", "bfloat16")]
    runs += [(f"{n}_stored", root / "bf16", {k: v for k, v in CONFIGS[n].items() if k != "dtype"}) for n in STORED]
    if names:
        runs = [r for r in runs if r[0].rsplit("_", 1)[0] in names.split(",")]
    for name, folder, config in runs:
        row = {"config": name, **run_pair(folder, name, config, mergekit_yaml)}
        rows.append(row)
        print(json.dumps(row))
    out = Path(__file__).resolve().parents[1] / "results" / "mergekit_configs.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main(*sys.argv[1:])
