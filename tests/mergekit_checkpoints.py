"""Small Llama-shaped safetensors checkpoints and a runner for configs written as mergekit writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.pipeline import merge_checkpoints

HIDDEN, INTER, VOCAB, LAYERS = 8, 8, 16, 3  # INTER = HIDDEN: few shape groups, few compilations


def llama(rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """A tiny Llama: HF names and torch (out, in) weights, LAYERS decoder layers."""
    flat = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, HIDDEN))}
    for i in range(LAYERS):
        pre = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            flat[f"{pre}.self_attn.{name}.weight"] = rng.normal(size=(HIDDEN, HIDDEN)) / 3
        flat[f"{pre}.mlp.gate_proj.weight"] = rng.normal(size=(INTER, HIDDEN)) / 3
        flat[f"{pre}.mlp.up_proj.weight"] = rng.normal(size=(INTER, HIDDEN)) / 3
        flat[f"{pre}.mlp.down_proj.weight"] = rng.normal(size=(HIDDEN, INTER)) / 3
        flat[f"{pre}.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(HIDDEN,))
        flat[f"{pre}.post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(HIDDEN,))
    flat["model.norm.weight"] = 1 + 0.1 * rng.normal(size=(HIDDEN,))
    flat["lm_head.weight"] = rng.normal(size=(VOCAB, HIDDEN))
    return {k: v.astype(dtype) for k, v in flat.items()}


def fine_tuned(base: dict[str, np.ndarray], rng: np.random.Generator, step: float = 0.1) -> dict[str, np.ndarray]:
    return {k: (v.astype(np.float64) + step * rng.normal(size=v.shape)).astype(v.dtype) for k, v in base.items()}


def save_model(folder: Path, flat: dict[str, np.ndarray], *, tokenizer: str = "base", template: str | None = None):
    ckio.save(folder, flat)
    dtype = "bfloat16" if str(next(iter(flat.values())).dtype) == "bfloat16" else str(next(iter(flat.values())).dtype)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": LAYERS,
                                                    "hidden_size": HIDDEN, "torch_dtype": dtype}))
    (folder / "tokenizer.json").write_text(json.dumps({"name": tokenizer}))
    config = {"name": tokenizer} if template is None else {"name": tokenizer, "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def family(root: Path, n_experts: int = 3, seed: int = 0, dtype=np.float32) -> dict[str, dict[str, np.ndarray]]:
    """base, e0, e1, ... saved under ``root``; returns their tensors (as saved)."""
    rng = np.random.default_rng(seed)
    models = {"base": llama(rng, dtype)}
    for i in range(n_experts):
        models[f"e{i}"] = fine_tuned(models["base"], rng)
    for name, flat in models.items():
        save_model(root / name, flat, tokenizer=name)
    return models


def write(root: Path, name: str, config: dict) -> Path:
    """``config`` as ``root/<name>.yaml``; returns its path."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(root: Path, config: dict, name: str = "out", **kwargs) -> dict[str, np.ndarray]:
    """Write ``config`` as YAML in ``root``, merge it into ``root/name`` and read the result."""
    merge_checkpoints(write(root, name, config), root / name, progress=False, **kwargs)
    return ckio.load(root / name)


def f64(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def layer_t(name: str) -> float:
    """mergekit's layer fraction, written independently: i/(L−1) in a layer, 0 outside the layers
    (mergekit plans embeddings, final norm and head with t = 0)."""
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) / (LAYERS - 1)
    return 0.0
