"""Run mergekit's own merge methods on the cross-check cases; save inputs and outputs.

Needs mergekit (and torch) in its own environment, never the project's:

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit
    /tmp/mkvenv/bin/python benchmarks/mergekit_crosscheck/run_mergekit.py OUT.npz

Random sparsifiers: ``torch.bernoulli(p)`` is replaced by ``u < p`` with the case's saved
uniforms (one model after another), so that both sides drop the same entries.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases


def main(out_path: str) -> None:
    out: dict[str, np.ndarray] = {}
    for kind, shape in (("normal", (48, 40)), ("grid", (10, 18))):
        data = cases.inputs(kind, shape)
        base, models, uniforms = data["base"], data["models"], data["uniforms"]
        out.update({f"{kind}/{k}": v for k, v in data.items()})
        state = {"i": 0}

        def fake_bernoulli(p, *args, **kwargs):
            u = torch.from_numpy(uniforms[state["i"] % cases.N])
            state["i"] += 1
            return (u < p.float()).to(p.dtype)

        torch.bernoulli = fake_bernoulli

        def run(name, params, base_index=0, tensors=None, dtype=None):
            tensors = [base] + list(models) if tensors is None else tensors
            group = TensorGroup.from_tensors([torch.from_numpy(np.asarray(t)) for t in tensors],
                                             base_index=base_index)
            state["i"] = 0
            return registry.get(name)([group], parameters=params, dtype=dtype)[0].float().numpy()

        for key, (name, params) in cases.FAMILY.items():
            out[f"{kind}/{key}"] = run(name, params)
            out[f"{kind}/{key}/bf16"] = run(name, params, dtype=torch.bfloat16)
            out[f"{kind}/{key}/f16"] = run(name, params, dtype=torch.float16)
        w4 = [1.0] + cases.W
        extra = {
            "linear": ("linear", {"weight": w4}, None, None),
            "linear_nonorm": ("linear", {"weight": w4, "normalize": False}, None, None),
            "slerp": ("slerp", {"t": 0.3}, 0, [base, models[0]]),
            "nuslerp_base": ("nuslerp", {"weight": [0.3, 0.9]}, 0, [base, models[0], models[1]]),
            "nuslerp_rows": ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": False}, None, [models[0], models[1]]),
            "nuslerp_cols": ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": True},
                             None, [models[0], models[1]]),
            "multislerp_base": ("multislerp", {"weight": cases.W}, 0, None),
            "multislerp": ("multislerp", {"weight": cases.W}, None, list(models)),
            "karcher": ("karcher", {}, None, list(models)),
            "model_stock": ("model_stock", {}, 0, None),
            "model_stock_filter_wise": ("model_stock", {"filter_wise": True}, 0, None),
            "nearswap": ("nearswap", {"t": 0.05}, 0, [base, models[0]]),
            "ram": ("ram", {"epsilon": 0.05}, 0, None),
            "ramplus_tl": ("ramplus_tl", {"epsilon": 0.05, "r": 0.5, "alpha": 0.3}, 0, None),
            "arcee_fusion": ("arcee_fusion", {}, 0, [base, models[0]]),
        }
        for key, (name, params, base_index, tensors) in extra.items():
            out[f"{kind}/{key}"] = run(name, params, base_index, tensors)
            out[f"{kind}/{key}/bf16"] = run(name, params, base_index, tensors, dtype=torch.bfloat16)
            out[f"{kind}/{key}/f16"] = run(name, params, base_index, tensors, dtype=torch.float16)
    np.savez(out_path, **out)
    print(f"saved {len(out)} arrays to {out_path}")


if __name__ == "__main__":
    main(sys.argv[1])
