"""Merge Hugging Face-layout safetensors experts on disk with the `swudi-merge` command.

Builds a tiny Llama-like base model (torch (out, in) weights named like
``model.layers.0.self_attn.q_proj.weight``, bf16, a sharded directory with an index and a
config.json) and three experts fine-tuned from it (low-rank weight deltas), copies
``merge_hf_safetensors.yaml`` next to them, runs ``swudi-merge CONFIG OUT`` (dry run, then
the merge), and loads the merged checkpoint back.

    python examples/merge_hf_safetensors.py [WORKDIR]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from swudi_jax.checkpoint import io

HIDDEN, LAYERS, VOCAB = 64, 2, 128
EXPERTS = ("expert_math", "expert_code", "expert_chat")


def base_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    weights = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, HIDDEN))}
    for i in range(LAYERS):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[f"model.layers.{i}.self_attn.{name}.weight"] = rng.normal(size=(HIDDEN, HIDDEN)) / HIDDEN**0.5
        weights[f"model.layers.{i}.mlp.up_proj.weight"] = rng.normal(size=(2 * HIDDEN, HIDDEN)) / HIDDEN**0.5
        weights[f"model.layers.{i}.mlp.down_proj.weight"] = rng.normal(size=(HIDDEN, 2 * HIDDEN)) / (2 * HIDDEN) ** 0.5
        weights[f"model.layers.{i}.input_layernorm.weight"] = np.ones(HIDDEN)
    weights["model.norm.weight"] = np.ones(HIDDEN)
    weights["lm_head.weight"] = rng.normal(size=(VOCAB, HIDDEN)) / HIDDEN**0.5
    return {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}


def fine_tune(base: dict[str, np.ndarray], rng: np.random.Generator, rank: int = 4) -> dict[str, np.ndarray]:
    """An expert: the base plus a low-rank delta on each matrix and a small shift elsewhere."""
    out = {}
    for key, w in base.items():
        w32 = w.astype(np.float32)
        if w.ndim == 2:
            delta = rng.normal(size=(w.shape[0], rank)) @ rng.normal(size=(rank, w.shape[1])) * 0.02 / rank
        else:
            delta = 0.01 * rng.normal(size=w.shape)
        out[key] = (w32 + delta).astype(w.dtype)
    return out


def main(workdir: Path) -> None:
    rng = np.random.default_rng(0)
    base = base_model(rng)
    io.save(workdir / "base", base, shard_size=100_000, force=True)  # sharded, with model.safetensors.index.json
    (workdir / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    for name in EXPERTS:
        io.save(workdir / name, fine_tune(base, rng), shard_size=100_000, force=True)
    config = workdir / "merge.yaml"
    shutil.copy(Path(__file__).with_suffix(".yaml"), config)

    command = [sys.executable, "-m", "swudi_jax.checkpoint.cli"] if shutil.which("swudi-merge") is None else ["swudi-merge"]
    out = workdir / "merged"
    subprocess.run([*command, str(config), str(out), "--dry-run"], check=True)
    subprocess.run([*command, str(config), str(out), "--force"], check=True)

    merged = io.load(out)
    print(f"\n{out}: {sorted(p.name for p in out.iterdir())}")
    q = "model.layers.0.self_attn.q_proj.weight"
    print(f"{len(merged)} tensors; {q}: {merged[q].dtype}{list(merged[q].shape)}, "
          f"moved {np.abs(merged[q].astype(np.float32) - base[q].astype(np.float32)).mean():.2e} from the base on average")
    assert np.array_equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # excluded: kept


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="swudi_hf_example_")))
