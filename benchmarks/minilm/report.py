"""The merge report on the MiniLM experts: its cost, its picture, and whether it ranks methods as accuracy does.

    python -m benchmarks.minilm.report                 # every method of the MiniLM table
    python -m benchmarks.minilm.report --methods swudi ties_paper --repeats 3
    python -m benchmarks.minilm.report --methods          # timing only (the ranking kept)

Three measurements on the cached experts (``python -m benchmarks.minilm.finetune`` first):

1. **Cost**: ``swudi-merge CONFIG OUT`` with and without ``--report`` for ``--timed`` methods,
   alternately, ``--repeats`` times each after one warm-up pair (the persistent compilation
   cache then holds both programs); wall time of the child process (start-up, I/O included)
   and its peak RSS.
2. **Ranking**: every method of ``--methods`` merged once with ``--report --score GRAMS`` (the
   data methods' input Grams of each expert on ``--calib`` of its own training examples), each
   merge scored on the test splits; the report's overall interference ratio, mean layer ratio and
   ρ are set beside the mean accuracy, with Spearman rank correlations.
3. **Picture**: the reports of SWUDI and TIES side by side (``report_swudi_ties.png``).

Writes ``report_vs_accuracy.json`` and the picture to ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

from benchmarks._measure import write_json
from benchmarks.minilm import bert
from benchmarks.minilm.finetune import DEFAULT_CACHE
from benchmarks.minilm.run import EXTRA_RUNS, RUN_PARAMETERS, evaluate, load_setup, run_merge, summarise, write_grams

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ENCODER = r"^encoder\.layer\.\d+\."
"""The encoder's Linear weights: the layers every method merges as linear (the data methods only these)."""
TABLE_METHODS = ("task_arithmetic@1", "task_arithmetic_paper", "ties_paper", "swudi", "swudi_a", "pinv", "wudi",
                 "average", "dare", "iwudi", "optmerge", "output_space", "regmean")
"""The rows of the MiniLM accuracy table (benchmarks/minilm/README.md)."""


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def _config(setup, name: str, calib: int) -> dict:
    method, scale = EXTRA_RUNS.get(name, (name, None))
    return setup.merge_config(method, scale, RUN_PARAMETERS.get(method, {}), calib)


def time_report(setup, workdir: Path, methods, repeats: int, calib: int, log=print) -> dict:
    """{method: {"plain": [(wall s, peak MiB)], "report": [...]}}, warm-up pair excluded."""
    out = {}
    for name in methods:
        config = _config(setup, name, calib)
        runs = {"plain": [], "report": []}
        for rep in range(repeats + 1):
            for kind, flags in (("plain", []), ("report", ["--report"])):
                merged, wall, peak = run_merge(config, workdir, f"time_{name}_{kind}", flags)
                shutil.rmtree(merged, ignore_errors=True)
                if rep:
                    runs[kind].append((wall, peak))
        out[name] = {**runs, "loadavg_after": os.getloadavg()}
        log(f"[{name}] plain {statistics.median(w for w, _ in runs['plain']):.2f}s, with --report "
            f"{statistics.median(w for w, _ in runs['report']):.2f}s")
    return out


def rank_methods(setup, workdir: Path, methods, calib: int, log=print) -> dict:
    """{method: accuracy, the report's overall figures} from one ``--report --score`` merge each."""
    test = setup.split("test")
    grams = write_grams(setup.experts, setup.tasks, setup.tokenizer, setup.cfg, calib,
                        setup.cache / f"grams_{calib}.safetensors")
    expert_acc = {t: setup.metrics[t]["expert_test_acc"] for t in setup.tasks}
    rows = {}
    for name in methods:
        merged, wall, peak = run_merge(_config(setup, name, calib), workdir, f"rank_{name.replace('@', '_at_')}",
                                       ["--report", "--score", str(grams)])
        try:
            accs = evaluate(bert.load_tensors(merged), setup.heads, test, setup.cfg)
            report = json.loads((merged / "merge_report.json").read_text())
        finally:
            keep = workdir / f"report_{name.replace('@', '_at_')}.json"
            shutil.copy(merged / "merge_report.json", keep)
            shutil.rmtree(merged, ignore_errors=True)
        overall = report["overall"]
        encoder = [x for x in report["layers"] if re.match(ENCODER, x["path"])]
        rows[name] = {"acc": accs, **summarise(accs, expert_acc), "ratio": overall["ratio"],
                      "encoder_ratio": sum(x["interference_merged"] for x in encoder)
                      / sum(x["interference_sum"] for x in encoder),
                      "mean_layer_ratio": overall["mean_layer_ratio"], "rho": overall["rho"]["merged"],
                      "layers": len(report["layers"]), "merge_wall_s": wall, "merge_peak_rss_mib": peak,
                      "report": str(keep)}
        log(f"[{name}] mean acc {rows[name]['mean_acc']:.4f} ratio {overall['ratio']:.4f} encoder ratio "
            f"{rows[name]['encoder_ratio']:.4f} mean layer ratio {overall['mean_layer_ratio']:.4f} "
            f"rho {overall['rho']['merged']:.4f}")
    return rows


def correlations(rows: dict) -> dict:
    """Spearman of each report figure with mean accuracy: over every method, without the
    pseudo-inverse (the objective's exact minimiser, which collapses), and over the data-free
    methods without it (RegMean and the output-space QP minimise another, data-based objective)."""
    from swudi_jax.methods import registry

    def data(name):
        return registry.get_method(EXTRA_RUNS.get(name, (name,))[0]).kind == "data"

    subsets = {"all": list(rows), "without_pinv": [n for n in rows if n != "pinv"],
               "data_free_without_pinv": [n for n in rows if n != "pinv" and not data(n)]}
    return {subset: {key: spearman([rows[n][key] for n in names], [rows[n]["mean_acc"] for n in names])
                     for key in ("ratio", "encoder_ratio", "mean_layer_ratio", "rho")}
            for subset, names in subsets.items() if len(names) > 2}


def draw(workdir: Path, out: Path) -> None:
    import swudi_jax as sj

    reports = [sj.read_report(workdir / f"report_{name}.json") for name in ("swudi", "ties_paper")]
    fig = sj.report_figure(reports, ["SWUDI", "TIES"])
    fig.savefig(out, dpi=110)


def tables(result: dict) -> str:
    lines = ["| method | merge, plain (s) | with --report (s) | extra | peak RSS plain / report (MiB) |",
             "|---|---|---|---|---|"]
    for name, runs in result.get("timing", {}).items():
        plain = statistics.median(w for w, _ in runs["plain"])
        rep = statistics.median(w for w, _ in runs["report"])
        rss = (max(p for _, p in runs["plain"]), max(p for _, p in runs["report"]))
        lines.append(f"| {name} | {plain:.2f} | {rep:.2f} | {rep - plain:+.2f} ({rep / plain - 1:+.0%}) | "
                     f"{rss[0]:.0f} / {rss[1]:.0f} |")
    lines += ["", "| method | mean acc | interference ratio | encoder layers only | mean layer ratio | rho |",
              "|---|---|---|---|---|---|"]
    rows = result.get("rows", {})
    for name in sorted(rows, key=lambda n: -rows[n]["mean_acc"]):
        r = rows[name]
        lines.append(f"| {name} | {100 * r['mean_acc']:.1f} | {r['ratio']:.3f} | {r['encoder_ratio']:.3f} | "
                     f"{r['mean_layer_ratio']:.3f} | {r['rho']:.3f} |")
    for subset, values in correlations(rows).items() if rows else ():
        lines.append(f"\nSpearman with mean accuracy ({subset}): " + ", ".join(f"{k} {v:+.2f}" for k, v in values.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--methods", nargs="*", default=list(TABLE_METHODS),
                        help="methods to rank (none: keep the last run's rows)")
    parser.add_argument("--timed", nargs="*", default=["swudi", "ties_paper"],
                        help="methods to time with and without --report (none: keep the last timings)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        setup = load_setup(args.cache, log=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workdir = args.out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    path = args.out / "report_vs_accuracy.json"
    result = json.loads(path.read_text()) if path.is_file() else {}  # a part not run keeps its last figures
    if args.timed:
        result["timing"] = time_report(setup, workdir, args.timed, args.repeats, args.calib, log)
    if args.methods:
        result["rows"] = rank_methods(setup, workdir, args.methods, args.calib, log)
        result["spearman_with_mean_acc"] = correlations(result["rows"])
    write_json(path, result)
    if {"swudi", "ties_paper"} <= set(args.methods):
        draw(workdir, args.out / "report_swudi_ties.png")
    print(tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
