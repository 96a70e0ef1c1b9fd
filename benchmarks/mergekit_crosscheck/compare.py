"""Compare swudi_jax's mergekit methods with mergekit's own outputs (from run_mergekit.py).

    /tmp/mkvenv/bin/python benchmarks/mergekit_crosscheck/run_mergekit.py /tmp/mk.npz
    python -m benchmarks.mergekit_crosscheck.compare /tmp/mk.npz

Prints, per case and dtype, the largest absolute difference, that difference relative to
the largest |mergekit value|, and the fraction of entries that are bit-equal; writes JSON
to benchmarks/results/mergekit_crosscheck.json. bf16 cases give both sides the same
bf16-rounded inputs (mergekit's ``dtype: bfloat16``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from benchmarks.mergekit_crosscheck import cases
from swudi_jax.methods import interpolation as ip
from swudi_jax.methods import mergekit_family as mf
from swudi_jax.methods import mergekit_selective as msel

RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def _family(name: str, params: dict, tau, uniforms):
    kw = {("lam" if k == "lambda" else k): v for k, v in params.items()}
    if name == "sce":
        return mf.sce(tau, **kw)
    if name in RANDOM:
        kw["uniforms"] = uniforms
    return getattr(mf, name)(tau, **kw)


def ours(key: str, data: dict, dtype) -> np.ndarray:
    base = jnp.asarray(data["base"], dtype)
    models = jnp.asarray(data["models"], dtype)
    if key in cases.FAMILY:
        name, params = cases.FAMILY[key]
        out = base + _family(name, params, models - base[None], data["uniforms"])
    else:
        w4 = [1.0] + cases.W
        everything = jnp.concatenate([base[None], models])
        out = {
            "linear": lambda: mf.linear(everything, w4),
            "linear_nonorm": lambda: mf.linear(everything, w4, normalize=False),
            "slerp": lambda: ip.slerp(base, models[0], 0.3),
            "nuslerp_base": lambda: ip.nuslerp(models[:2], [0.3, 0.9], base),
            "nuslerp_rows": lambda: ip.nuslerp(models[:2], [0.3, 0.9], flatten=False),
            "nuslerp_cols": lambda: ip.nuslerp(models[:2], [0.3, 0.9], flatten=False, row_wise=True),
            "multislerp_base": lambda: ip.multislerp(models, cases.W, base),
            "multislerp": lambda: ip.multislerp(models, cases.W),
            "karcher": lambda: ip.karcher(models),
            "model_stock": lambda: ip.model_stock(base, models),
            "model_stock_filter_wise": lambda: ip.model_stock(base, models, filter_wise=True),
            "nearswap": lambda: ip.nearswap(base, models[0], 0.05),
            "ram": lambda: base + msel.ram(models - base[None], epsilon=0.05),
            "ramplus_tl": lambda: msel.ramplus_tl(models - base[None], epsilon=0.05, r=0.5, alpha=0.3, base=base),
            "arcee_fusion": lambda: msel.arcee_fusion(base, models[0]),
        }[key]()
    return np.asarray(jnp.asarray(out).astype(jnp.float32))


MANTISSA = {"f32": 23, "bf16": 7, "f16": 10}


def within_ulps(got: np.ndarray, want: np.ndarray, dtype: str, ulps: int = 1) -> float:
    """The fraction of entries within ``ulps`` units in the last place of the dtype at the
    mergekit value (its spacing at |want|; at 0, the smallest normal spacing)."""
    want = np.asarray(want, np.float64)
    exp = np.floor(np.log2(np.maximum(np.abs(want), np.finfo(np.float32).tiny)))
    if dtype == "f16":
        exp = np.maximum(exp, -14)
    ulp = np.exp2(exp - MANTISSA[dtype])
    return float(np.mean(np.abs(np.asarray(got, np.float64) - want) <= ulps * ulp))


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    theirs = dict(np.load(argv[0]))
    rows = []
    for kind in ("normal", "grid"):
        data = {k: theirs[f"{kind}/{k}"] for k in ("base", "models", "uniforms")}
        keys = sorted({k.split("/")[1] for k in theirs if k.startswith(kind + "/")} - {"base", "models", "uniforms"})
        for key in keys:
            for suffix, dtype in (("", jnp.float32), ("/bf16", jnp.bfloat16), ("/f16", jnp.float16)):
                name = suffix.strip("/") or "f32"
                # mergekit writes its result in the merge dtype (ramplus_tl and arcee_fusion return float32)
                want = np.asarray(jnp.asarray(theirs[f"{kind}/{key}{suffix}"]).astype(dtype).astype(jnp.float32))
                got = ours(key, data, dtype)
                err = float(np.max(np.abs(got - want)))
                rows.append({"inputs": kind, "case": key, "dtype": name,
                             "max_abs": err, "rel_to_max": err / float(np.max(np.abs(want))),
                             "bit_equal": float(np.mean(got == want)), "within_1ulp": within_ulps(got, want, name)})
    print(f"{'inputs':7s} {'case':26s} {'dtype':5s} {'max |diff|':>11s} {'rel':>10s} {'bit-equal':>9s} {'<=1 ulp':>9s}")
    for r in rows:
        print(f"{r['inputs']:7s} {r['case']:26s} {r['dtype']:5s} {r['max_abs']:11.3e} {r['rel_to_max']:10.2e} "
              f"{r['bit_equal']:9.4f} {r['within_1ulp']:9.4f}")
    out = Path(__file__).resolve().parents[1] / "results" / "mergekit_crosscheck.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    main()
