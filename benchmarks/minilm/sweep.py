"""Choose a method's hyperparameters on the validation splits (never the test splits).

    python -m benchmarks.minilm.sweep swudi --grid time=30,100,300,1300 rank_ratio=0.65,0.85,1.0

Every combination of the grid goes through ``swudi-merge`` on the cached experts and is
scored on each task's validation split with that task's expert head; the table of mean and
mean normalised validation accuracy is printed and written to ``sweep_<method>.json``. The
SWUDI defaults (t = 1300, r = 0.65) were tuned on CLIP ViT; this is how to check them on text.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from benchmarks.minilm.finetune import DEFAULT_CACHE
from benchmarks.minilm.run import DEFAULT_OUT, _write_json, load_setup, merge_and_score, summarise


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["time=30,100", "init=sum"]`` -> ``{"time": [30.0, 100.0], "init": ["sum"]}``."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"grid entry {item!r} must look like name=v1,v2,...")
        grid[key] = [_number_or_text(v) for v in values.split(",")]
    return grid


def _number_or_text(value: str):
    try:
        return float(value) if any(c in value for c in ".e") else int(value)
    except ValueError:
        return value


def sweep(cache: Path, out_dir: Path, method: str, grid: dict[str, list], scales: list[float | None],
          log=print) -> list[dict]:
    """Score every grid point (× every scale) on the validation splits; best first."""
    setup = load_setup(cache, log=log)
    val = setup.split("val")
    expert_val = {t: setup.metrics[t]["expert_val_acc"] for t in setup.tasks}
    workdir = out_dir / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        for scale in scales:
            params = dict(zip(keys, values))
            row = merge_and_score(setup, setup.merge_config(method, scale, params), val, workdir, f"sweep_{method}")
            row.update(summarise(row["acc"], expert_val), parameters=params, scale=scale)
            results.append(row)
            log(f"[{method}] {params} scale={scale}: val mean {row['mean_acc']:.4f} "
                f"normalised {row['mean_normalised_acc']:.4f}")
            _write_json(out_dir / f"sweep_{method}.json", {"method": method, "split": "val", "results": results})
    return sorted(results, key=lambda r: -r["mean_acc"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--grid", nargs="*", default=[], help="name=v1,v2,... option values")
    parser.add_argument("--scales", nargs="*", type=float, default=None, help="merge scales (default: method's)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        results = sweep(args.cache, args.out, args.method, parse_grid(args.grid), args.scales or [None],
                        log=lambda s: print(s, flush=True))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("| parameters | scale | val mean acc | val mean norm. acc |\n|---|---|---|---|")
    for row in results:
        print(f"| {json.dumps(row['parameters'])} | {row['scale']} | {100 * row['mean_acc']:.1f} | "
              f"{100 * row['mean_normalised_acc']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
