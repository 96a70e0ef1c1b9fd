"""Output-space evaluation: accuracy and the residual-energy diagnostic ρ of every method.

On the built-in demo (:mod:`swudi_jax.demo`: a Flax MLP pre-trained on scikit-learn's digits,
one expert fine-tuned per transformed-digits task, each task keeping its expert's head) the
experts' backbones are merged by

- the data-free methods at their registry defaults (task arithmetic, also at scale 1,
  averaging, TIES, DARE, WUDI, pinv, SWUDI, SWUDI-A), via ``swudi_jax.merge``;
- the data methods, from a little calibration data per task (``--calib`` training images,
  in batches of ``--batch``): output-space projection (diagonal QP, and the "energy" basis)
  and RegMean, one pass with Grams from each expert on its own task (``swudi_jax.merge``
  with ``grams=``); RegMean++ and sequential output-space projection
  (``swudi_jax.layerwise_merge(inputs="merged")``), local and global targets.

For every merged model it reports per-task test accuracy and, per Dense layer, ρ(Δ) =
1 − L(Δ)/E from the one-pass Grams (the experts' own activations: the same E for every
method, so ρ is comparable across methods), plus the mean ρ measured on the inputs each
layer receives inside its merged model ("in-model ρ"). Finally it reports the Pearson and
Spearman correlation across merged models between mean ρ and mean accuracy.

    python -m benchmarks.output_space_eval            # the demo's full configuration
    python -m benchmarks.output_space_eval --quick    # tiny configuration (about a minute)

Prints a table and writes JSON (default ``benchmarks/results/output_space_eval.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from scipy import stats

import swudi_jax
from benchmarks._measure import write_json
from swudi_jax.methods import registry
from swudi_jax.demo import FULL, QUICK, evaluate, train_experts

DATA_FREE = ("task_arithmetic_paper", "average", "ties_paper", "dare", "wudi", "pinv", "swudi", "swudi_a")


def calibration_batches(setup, size: int, batch: int, seed: int) -> list[list[np.ndarray]]:
    """Per task, ``size`` training images drawn once (fixed seed), cut into batches."""
    rng = np.random.default_rng(seed)
    out = []
    for task in setup.tasks:
        pick = rng.choice(len(task.x_train), size=min(size, len(task.x_train)), replace=False)
        x = task.x_train[np.sort(pick)]
        out.append([x[i:i + batch] for i in range(0, len(x), batch)])
    return out


def merged_models(setup, batches, grams, apply_fn):
    """Yield (label, merged backbone, extra info) for every method compared."""
    for name in DATA_FREE:
        yield name, swudi_jax.merge(setup.base, setup.experts, name), {"scale": registry.default_scale(name)}
        if name == "task_arithmetic_paper":
            yield "task_arithmetic_paper (scale 1)", swudi_jax.merge(setup.base, setup.experts, name, scale=1.0), {"scale": 1.0}
    yield "output_space (diagonal)", swudi_jax.merge(setup.base, setup.experts, "output_space", grams=grams), {}
    yield ("output_space (energy basis)",
           swudi_jax.merge(setup.base, setup.experts, "output_space", grams=grams, basis="energy"), {})
    yield "regmean", swudi_jax.merge(setup.base, setup.experts, "regmean", grams=grams), {}
    for label, method, targets, options in [
        ("regmean++", "regmean", "local", {}),
        ("output_space sequential (local)", "output_space", "local", {}),
        ("output_space sequential (global)", "output_space", "global", {}),
        ("output_space sequential energy (local)", "output_space", "local", {"basis": "energy"}),
    ]:
        result = swudi_jax.layerwise_merge(apply_fn, setup.base, setup.experts, batches, method=method,
                                           inputs="merged", targets=targets, **options)
        yield label, result.variables, {"fitted_rho": result.rho}


def correlation(x, y) -> dict:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"pearson": None, "spearman": None}
    return {"pearson": float(stats.pearsonr(x, y)[0]), "spearman": float(stats.spearmanr(x, y)[0])}


def run(config, calib: int, batch: int, seed: int, log=print) -> dict:
    start = time.perf_counter()
    log(f"training the demo experts ({config.n_tasks} tasks, widths {config.features})")
    setup = train_experts(config)
    model = setup.model

    def apply_fn(variables, x):
        return model.apply(variables, x)

    batches = calibration_batches(setup, calib, batch, seed)
    grams = swudi_jax.task_grams(apply_fn, setup.experts, batches).mean_grams()
    layers = list(grams)
    reference = np.diag(np.stack([evaluate(model, e, setup.heads, setup.tasks) for e in setup.experts]))
    rows = [{"name": "pretrained", "accuracy": evaluate(model, setup.base, setup.heads, setup.tasks).tolist()},
            {"name": "experts (own task)", "accuracy": reference.tolist()}]
    for label, merged, extra in merged_models(setup, batches, grams, apply_fn):
        log(f"scoring {label}")
        accuracy = evaluate(model, merged, setup.heads, setup.tasks)
        rho = swudi_jax.layer_scores(setup.base, setup.experts, merged, grams)
        in_model = swudi_jax.layer_scores(setup.base, setup.experts, merged,
                                          swudi_jax.task_grams(apply_fn, merged, batches).mean_grams())
        rows.append({"name": label, "accuracy": accuracy.tolist(), "rho": [rho[p] for p in layers],
                     "in_model_rho": [in_model[p] for p in layers], **extra})
    for row in rows:
        row["mean"] = float(np.mean(row["accuracy"]))
        row["normalised_mean"] = float(np.mean(np.asarray(row["accuracy"]) / reference))
        if "rho" in row:
            row["mean_rho"] = float(np.mean(row["rho"]))
            row["mean_in_model_rho"] = float(np.mean(row["in_model_rho"]))
    merged_rows = [r for r in rows if "rho" in r]
    accuracy = [r["mean"] for r in merged_rows]
    return {
        "config": {"demo": dataclasses.asdict(config),
                   "calibration_images_per_task": calib, "batch": batch, "seed": seed},
        "tasks": [t.name for t in setup.tasks],
        "layers": layers,
        "rows": rows,
        "correlation_mean_rho_vs_mean_accuracy": correlation([r["mean_rho"] for r in merged_rows], accuracy),
        "correlation_in_model_rho_vs_mean_accuracy": correlation(
            [r["mean_in_model_rho"] for r in merged_rows], accuracy),
        "seconds": time.perf_counter() - start,
    }


def format_table(result: dict) -> str:
    short = [p.split("/")[-2] for p in result["layers"]]
    header = ["model", *result["tasks"], "mean", *(f"ρ {s}" for s in short), "mean ρ", "in-model ρ"]
    body = []
    for row in result["rows"]:
        cells = [row["name"], *(f"{100 * a:.1f}" for a in row["accuracy"]), f"{100 * row['mean']:.1f}"]
        if "rho" in row:
            cells += [f"{r:.3f}" for r in row["rho"]] + [f"{row['mean_rho']:.3f}", f"{row['mean_in_model_rho']:.3f}"]
        else:
            cells += [""] * (len(short) + 2)
        body.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines.append("")
    for key, label in [("correlation_mean_rho_vs_mean_accuracy", "mean ρ"),
                       ("correlation_in_model_rho_vs_mean_accuracy", "in-model ρ")]:
        c = result[key]
        if c["pearson"] is not None:
            lines.append(f"{label} vs mean accuracy across {len(body) - 2} merged models: "
                         f"Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's tiny configuration")
    parser.add_argument("--calib", type=int, default=256, help="calibration images per task")
    parser.add_argument("--batch", type=int, default=64, help="calibration batch size")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample seed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/output_space_eval.json"))
    args = parser.parse_args(argv)
    result = run(QUICK if args.quick else FULL, args.calib, args.batch, args.seed)
    table = format_table(result)
    print(table)
    write_json(args.out, {**result, "table": table})
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
