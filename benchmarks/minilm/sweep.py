"""Choose a method's hyperparameters on the validation splits (never the test splits).

    python -m benchmarks.minilm.sweep swudi --grid time=30,100,300,1300 rank_ratio=0.65,0.85,1.0
    python -m benchmarks.minilm.sweep swudi --axes --grid gamma=0.5,2 alignment=0.5,1 --confirm

Every point goes through ``swudi-merge`` on the cached experts and is scored on each task's
validation split with that task's expert head; the table of mean and mean normalised
validation accuracy is printed and written to ``sweep_<method>.json``.

- ``--grid`` alone: every combination of the listed values.
- ``--axes``: one option at a time, the others at the method's defaults, plus the defaults
  themselves (``{}``); ``--point "k1=v1 k2=v2"`` adds combined points (e.g. a filter and its time).
- ``--confirm``: the selection is made on validation only; then each option's best
  validation point that beats the defaults there is scored once on the test splits next to
  the defaults, and the test difference is compared with the standard error of the mean
  test accuracy, SE = √(Σ_t p_t(1 − p_t)/n_t) / T over the T tasks (p_t the defaults'
  accuracy, n_t the test size).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.minilm.finetune import DEFAULT_CACHE
from benchmarks._measure import write_json
from benchmarks.minilm.run import DEFAULT_OUT, load_setup, merge_and_score, summarise


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["time=30,100", "init=sum"]`` -> ``{"time": [30.0, 100.0], "init": ["sum"]}``."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"grid entry {item!r} must look like name=v1,v2,...")
        grid[key] = [_number_or_text(v) for v in values.split(",")]
    return grid


def parse_point(text: str) -> dict:
    """``"filter=exponential time=1300"`` -> ``{"filter": "exponential", "time": 1300}``."""
    point = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError(f"point entry {item!r} must look like name=value")
        point[key] = _number_or_text(value)
    return point


def _number_or_text(value: str):
    try:
        return float(value) if any(c in value for c in ".e") else int(value)
    except ValueError:
        return value


def grid_points(grid: dict[str, list], axes: bool, points: list[dict] = ()) -> list[dict]:
    """The parameter sets to score: the full product, or (``axes``) the defaults ``{}`` then each
    option's values alone; ``points`` are appended as given."""
    if axes:
        out = [{}] + [{key: value} for key, values in grid.items() for value in values]
    else:
        keys = list(grid)
        out = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return out + [p for p in points if p not in out]


def mean_acc_se(accs: dict[str, float], sizes: dict[str, int]) -> float:
    """Standard error of the mean over tasks of per-task accuracies: √(Σ p(1 − p)/n) / T."""
    return math.sqrt(sum(p * (1 - p) / sizes[t] for t, p in accs.items())) / len(accs)


def option_winners(results: list[dict]) -> list[dict]:
    """Per swept option (the key set of a point), its best validation point, if it beats the
    defaults' validation mean accuracy."""
    default = next(r for r in results if r["parameters"] == {} and r["scale"] is None)
    best: dict[tuple, dict] = {}
    for row in results:
        key = tuple(sorted(row["parameters"]))
        if key and (key not in best or row["mean_acc"] > best[key]["mean_acc"]):
            best[key] = row
    return [r for r in best.values() if r["mean_acc"] > default["mean_acc"]]


def sweep(cache: Path, out_dir: Path, method: str, points: list[dict], scales: list[float | None],
          confirm: bool = False, log=print) -> dict:
    """Score every point (× every scale) on the validation splits; with ``confirm``, score each
    option's validation winner and the defaults on the test splits. Returns the report."""
    setup = load_setup(cache, log=log)
    val = setup.split("val")
    expert_val = {t: setup.metrics[t]["expert_val_acc"] for t in setup.tasks}
    workdir = out_dir / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"method": method, "selection_split": "val", "results": [], "test": []}
    start = time.perf_counter()
    for params in points:
        for scale in scales:
            row = merge_and_score(setup, setup.merge_config(method, scale, params), val, workdir, f"sweep_{method}")
            row.update(summarise(row["acc"], expert_val), parameters=params, scale=scale)
            report["results"].append(row)
            log(f"[{method}] {params} scale={scale}: val mean {row['mean_acc']:.4f} "
                f"normalised {row['mean_normalised_acc']:.4f}")
            report["sweep_wall_s"] = time.perf_counter() - start
            write_json(out_dir / f"sweep_{method}.json", report)
    report["results"].sort(key=lambda r: -r["mean_acc"])
    if confirm and any(r["parameters"] == {} for r in report["results"]):
        test = setup.split("test")
        sizes = {t: len(labels) for t, (_, _, labels) in test.items()}
        expert_test = {t: setup.metrics[t]["expert_test_acc"] for t in setup.tasks}
        default = merge_and_score(setup, setup.merge_config(method, None, {}), test, workdir, f"sweep_{method}")
        default.update(summarise(default["acc"], expert_test), parameters={},
                       val_mean_acc=next(r["mean_acc"] for r in report["results"] if r["parameters"] == {}))
        se = mean_acc_se(default["acc"], sizes)
        report["test"].append(default)
        for winner in option_winners(report["results"]):
            row = merge_and_score(setup, setup.merge_config(method, None, winner["parameters"]), test, workdir,
                                  f"sweep_{method}")
            row.update(summarise(row["acc"], expert_test), parameters=winner["parameters"],
                       val_mean_acc=winner["mean_acc"])
            row.update(test_minus_default=row["mean_acc"] - default["mean_acc"], default_test_se=se,
                       beats_default=row["mean_acc"] - default["mean_acc"] > se)
            report["test"].append(row)
            log(f"[{method}] test {winner['parameters']}: {row['mean_acc']:.4f} vs defaults "
                f"{default['mean_acc']:.4f} (SE {se:.4f})")
        report["sweep_wall_s"] = time.perf_counter() - start
    write_json(out_dir / f"sweep_{method}.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--grid", nargs="*", default=[], help="name=v1,v2,... option values")
    parser.add_argument("--axes", action="store_true", help="vary one option at a time from the defaults")
    parser.add_argument("--point", nargs="*", default=[], help='extra points, each "k1=v1 k2=v2"')
    parser.add_argument("--confirm", action="store_true",
                        help="score each option's validation winner and the defaults on the test splits")
    parser.add_argument("--scales", nargs="*", type=float, default=None, help="merge scales (default: method's)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        points = grid_points(parse_grid(args.grid), args.axes, [parse_point(p) for p in args.point])
        report = sweep(args.cache, args.out, args.method, points, args.scales or [None], args.confirm,
                       log=lambda s: print(s, flush=True))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sweep wall time {report['sweep_wall_s']:.0f} s")
    print("| parameters | scale | val mean acc | val mean norm. acc |\n|---|---|---|---|")
    for row in report["results"]:
        print(f"| {json.dumps(row['parameters'])} | {row['scale']} | {100 * row['mean_acc']:.1f} | "
              f"{100 * row['mean_normalised_acc']:.1f} |")
    if report["test"]:
        print("\n| parameters (val winner) | val mean acc | test mean acc | test − defaults | SE | > SE |\n"
              "|---|---|---|---|---|---|")
        for row in report["test"]:
            diff = row.get("test_minus_default")
            cells = ["", "", ""] if diff is None else [
                f"{100 * diff:+.1f}", f"{100 * row['default_test_se']:.1f}", str(row["beats_default"])]
            print(f"| {json.dumps(row['parameters'])} | {100 * row.get('val_mean_acc', math.nan):.1f} | "
                  f"{100 * row['mean_acc']:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
