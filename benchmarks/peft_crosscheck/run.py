"""Cross-check of swudi-merge's LoRA paths against PEFT itself (opt-in; not part of the tests).

Runs in a venv that holds torch, transformers and peft (never the project's); swudi-merge runs
in the project's Python, given by ``--swudi-python``:

    /work/mkvenv/bin/python benchmarks/peft_crosscheck/run.py /tmp/peft_xc \\
        --swudi-python /work/main/.venv/bin/python

1. A tiny ``LlamaForCausalLM`` (hidden 64, MLP 128, 2 layers, vocab 128, float32) built from a
   ``LlamaConfig`` and saved; three adapters made by ``get_peft_model`` (rank 4 on every
   projection; rank 8 rsLoRA with ``rank_pattern``/``alpha_pattern``; rank 4 on q/v only), their
   ``lora_B`` drawn at random (PEFT starts them at zero), saved by ``save_pretrained``.
2. swudi-merge: swudi (float64 compute) to a dense checkpoint and to ``out_format: peft``;
   task_arithmetic with per-model weights to ``out_format: peft``.
3. The swudi adapter loads with ``PeftModel.from_pretrained``; its ``merge_and_unload()`` weights
   are compared with the dense output. The three input adapters are loaded into one PeftModel and
   ``add_weighted_adapter(..., combination_type="cat")`` with the same weights builds PEFT's
   concatenated adapter; its ``merge_and_unload()`` is compared with our task_arithmetic adapter's.
   Each adapter's logits on a fixed batch are compared too.

Prints a table and writes ``results.json`` in the work folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = [0.7, 1.3, 0.5]
ADAPTERS = {
    "a1": LoraConfig(r=4, lora_alpha=8, target_modules=PROJ),
    "a2": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=PROJ, rank_pattern={"down_proj": 4},
                     alpha_pattern={"v_proj": 3}),
    "a3": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
}


def base_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def make_inputs(work: Path) -> None:
    base_model().save_pretrained(work / "base")
    for i, (name, config) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        model = get_peft_model(base_model(), config)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.copy_(0.05 * torch.randn_like(param))
        model.save_pretrained(work / name)


def swudi_merge(work: Path, python: str, name: str, config: dict) -> Path:
    (work / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([python, "-m", "swudi_jax_cli", str(work / f"{name}.yaml"), str(out), "--no-progress"],
                   cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return out


def merged_weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.merge_and_unload().state_dict().items()}


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.double().numpy()


def max_rel(got: dict, want: dict, base: dict) -> tuple[float, str]:
    """The largest ‖got − want‖ / ‖want − base‖ over tensors with a task vector."""
    worst = (0.0, "")
    for k, w in want.items():
        tau = np.linalg.norm(w - base[k])
        if tau > 1e-6 * np.linalg.norm(base[k]):
            worst = max(worst, (float(np.linalg.norm(got[k] - w) / tau), k))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--swudi-python", required=True)
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    make_inputs(work)
    common = {"base_model": "base", "models": list(ADAPTERS), "merge_method": "swudi",
              "parameters": {"time": 300.0, "rank_ratio": 0.85}, "dtype": "float64", "out_dtype": "float32"}
    dense = swudi_merge(work, args.swudi_python, "swudi_dense", common)
    ours = swudi_merge(work, args.swudi_python, "swudi_adapter", {**common, "out_format": "peft"})
    ta = swudi_merge(work, args.swudi_python, "ta_adapter", {
        "base_model": "base", "merge_method": "task_arithmetic", "out_format": "peft",
        "models": [{"model": a, "parameters": {"weight": w}} for a, w in zip(ADAPTERS, WEIGHTS)]})

    base = {k: v.detach().double().numpy() for k, v in base_model().state_dict().items()}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    loaded = PeftModel.from_pretrained(base_model(), ours).eval()
    swudi_logits = logits(loaded, ids)
    swudi_merged = merged_weights(loaded)
    dense_weights = {k: v.astype(np.float64) for k, v in load_file(dense / "model.safetensors").items()}
    dense_model = base_model()
    dense_model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in dense_weights.items()},
                                strict=False)

    cat = PeftModel.from_pretrained(base_model(), work / "a1", adapter_name="a1").eval()
    for name in ("a2", "a3"):
        cat.load_adapter(work / name, adapter_name=name)
    cat.add_weighted_adapter(list(ADAPTERS), WEIGHTS, "cat", combination_type="cat")
    cat.set_adapter("cat")
    cat_logits = logits(cat, ids)
    cat_merged = merged_weights(cat)
    ta_model = PeftModel.from_pretrained(base_model(), ta).eval()
    ta_logits = logits(ta_model, ids)
    ta_merged = merged_weights(ta_model)

    rows = {
        "swudi adapter, PeftModel.merge_and_unload vs swudi-merge dense": max_rel(swudi_merged, dense_weights, base),
        "swudi adapter logits (PEFT) vs dense output logits": (
            float(np.abs(swudi_logits - logits(dense_model, ids)).max() / np.abs(swudi_logits).max()), "logits"),
        "task_arithmetic adapter vs PEFT add_weighted_adapter(cat), merged weights": max_rel(ta_merged, cat_merged, base),
        "task_arithmetic adapter vs PEFT cat, logits": (
            float(np.abs(ta_logits - cat_logits).max() / np.abs(cat_logits).max()), "logits"),
    }
    ranks = {"swudi": json.loads((ours / "adapter_config.json").read_text())["rank_pattern"],
             "r": json.loads((ours / "adapter_config.json").read_text())["r"]}
    print("| check | largest relative difference | where |\n|---|---|---|")
    for label, (value, where) in rows.items():
        print(f"| {label} | {value:.1e} | {where} |")
    results = {"rows": {k: {"max_rel": v, "where": w} for k, (v, w) in rows.items()}, "ranks": ranks,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": __import__("peft").__version__}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {work / 'results.json'}")


if __name__ == "__main__":
    main()
