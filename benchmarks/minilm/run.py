"""Merge the cached MiniLM experts with every registry method through ``swudi-merge`` and score them.

    python -m benchmarks.minilm.finetune            # once: fine-tune and cache the experts
    python -m benchmarks.minilm.run [--methods ...] # merge, evaluate, write JSON + PNG + table
    python -m benchmarks.minilm.run --resume        # an interrupted run: merge only the missing rows

For each method the experts' ``model.safetensors`` files go through the real user path: a
YAML config and the ``swudi-merge CONFIG OUT`` command in a child process (its wall time and
peak resident memory are measured with ``os.wait4``). The merged encoder is then read back
and each task is scored on its test split with that task's own expert head (heads are
task-specific and never merged). Every method runs with its registry defaults; nothing is
tuned on a test split. Data methods (RegMean, output-space) get per-layer input Grams of each
expert on ``--calib`` examples of its own training split.

The report: per-task accuracy, mean accuracy, mean normalised accuracy (merged / expert)
for every method, next to the experts, the pretrained encoder with each expert's head, and
task arithmetic at scale 1 (``task_arithmetic@1``, the interference check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from benchmarks._measure import measured_process, write_json
from benchmarks.minilm import bert
from benchmarks.minilm.data import TaskSpec, load_task
from benchmarks.minilm.finetune import DEFAULT_CACHE, FinetuneConfig, prepare_cache, save_safetensors

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "minilm"
EXTRA_RUNS = {"task_arithmetic@1": ("task_arithmetic_paper", 1.0)}
"""Extra rows beyond the registry defaults: name -> (method, scale)."""
PREFERRED_ORDER = ("task_arithmetic@1", "task_arithmetic_paper", "ties_paper", "swudi", "swudi_a", "pinv", "wudi")
"""Default run order: the rows the SWUDI paper compares come first (the JSON is rewritten
after every method, so an interrupted run keeps them)."""
RUN_PARAMETERS = {"wudi": {"gradient": "gram"}}
"""Not hyperparameters: the same WUDI gradient 2(θC − D) in its Gram form. The default
"reference" form autodiffs Σ wi‖(θ − τi)τiᵀ‖², whose (m × m) intermediate is 30522² floats
(3.7 GB) per task on the word-embedding table and exhausted this machine's memory."""
DATA_METHOD_INCLUDE = r"re:^encoder\.layer\.\d+\..*\.weight$"
"""The Linear weights the data methods merge (they have input Grams); see ``write_grams``."""


def read_manifest(cache: Path) -> dict:
    manifest = cache / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: fine-tune the experts first with "
                                f"`python -m benchmarks.minilm.finetune --cache {cache}`")
    return json.loads(manifest.read_text())


def swudi_merge_command() -> list[str]:
    """The installed ``swudi-merge`` console script (next to this interpreter, else on PATH)."""
    beside = Path(sys.executable).with_name("swudi-merge")
    found = str(beside) if beside.is_file() else shutil.which("swudi-merge")
    if not found:
        raise FileNotFoundError("the `swudi-merge` command is not installed: pip install -e .")
    return [found]


def run_merge(config: dict, workdir: Path, name: str, flags: Sequence[str] = ()) -> tuple[Path, float, float]:
    """Write ``config`` as YAML, run ``swudi-merge`` on it (with ``flags``); (output dir, wall s, peak RSS MiB)."""
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = workdir / f"merged_{name}"
    if out.exists():
        shutil.rmtree(out)
    log = workdir / f"{name}.log"
    with log.open("wb") as handle:
        usage = measured_process([*swudi_merge_command(), str(cfg_path), str(out), "--no-progress", *flags],
                                 stdout=handle, stderr=subprocess.STDOUT)
    if usage["returncode"] != 0:
        raise RuntimeError(f"swudi-merge failed for {name} (exit {usage['returncode']}); log {log}:\n"
                           + log.read_text()[-3000:])
    return out, usage["wall_s"], usage["peak_rss_bytes"] / 2**20


def write_grams(experts: dict[str, Path], tasks: dict, tokenizer, cfg: bert.BertConfig,
                calib: int, path: Path) -> Path:
    """``{linear weight: (N, n, n)}`` input Grams, expert i on ``calib`` of task i's training texts."""
    if path.is_file():
        return path
    per_task = []
    for name, folder in experts.items():
        params = bert.load_tensors(folder / "model.safetensors")
        ids, mask = bert.tokenize(tokenizer, tasks[name].train.texts[:calib])
        per_task.append(bert.input_grams(params, ids, mask, cfg))
    stacked = {k: np.stack([g[k] for g in per_task]).astype(np.float32) for k in per_task[0]}
    save_safetensors(path, stacked)
    return path


def evaluate(params: dict, heads: dict, test: dict, cfg: bert.BertConfig) -> dict[str, float]:
    """Test accuracy of ``params`` on every task with that task's head."""
    return {name: float((bert.predict(params, heads[name], ids, mask, cfg) == labels).mean())
            for name, (ids, mask, labels) in test.items()}


def summarise(accs: dict[str, float], expert: dict[str, float]) -> dict[str, float]:
    return {"mean_acc": float(np.mean(list(accs.values()))),
            "mean_normalised_acc": float(np.mean([accs[t] / expert[t] for t in accs]))}


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a merge-and-score run needs, loaded once from a verified expert cache."""

    cache: Path
    tasks: dict
    experts: dict[str, Path]
    heads: dict[str, dict]
    metrics: dict[str, dict]
    config: FinetuneConfig
    cfg: bert.BertConfig
    tokenizer: object

    def split(self, part: str) -> dict[str, tuple]:
        """``{task: (ids, mask, labels)}`` of one part ("val" or "test") of every task."""
        out = {}
        for name, task in self.tasks.items():
            texts, labels = getattr(task, part).texts, getattr(task, part).labels
            out[name] = (*bert.tokenize(self.tokenizer, texts), labels)
        return out

    def merge_config(self, method: str, scale: float | None = None, parameters: dict | None = None,
                     calib: int = 256) -> dict:
        """The ``swudi-merge`` YAML content merging the cached experts with ``method``."""
        from swudi_jax.methods import registry

        config = {"base_model": str(bert.model_dir() / "model.safetensors"),
                  "models": [str(self.experts[t] / "model.safetensors") for t in self.tasks],
                  "merge_method": method, "parameters": dict(parameters or {}), "layout": "torch"}
        if scale is not None:
            config["scale"] = scale
        if registry.get_method(method).kind == "data":
            # Grams exist for the encoder's Linear layers only; the embedding tables get the
            # mean task vector (MATH.md section 2: every tensor outside the merged set).
            config["include"] = [DATA_METHOD_INCLUDE]
            config["grams"] = str(write_grams(self.experts, self.tasks, self.tokenizer, self.cfg, calib,
                                              self.cache / f"grams_{calib}.safetensors"))
        return config


def load_setup(cache: Path, specs: dict[str, TaskSpec | None] | None = None, log=print) -> Setup:
    """Verify the cache against its recorded hash (fine-tuning what is missing) and load it."""
    manifest = read_manifest(cache)
    order = list(manifest["tasks"])
    config = FinetuneConfig(**manifest.get("config", {}))
    specs = specs or {t: (TaskSpec(**s) if s else None) for t, s in manifest.get("specs", {}).items()} or None
    experts = prepare_cache(cache, order, config, specs, log=log)  # refuses a mismatched cache
    folder = bert.model_dir()
    return Setup(
        cache=cache,
        tasks={t: load_task(t, config.split_seed, (specs or {}).get(t)) for t in order},
        experts=experts,
        heads={t: bert.load_tensors(experts[t] / "head.safetensors") for t in order},
        metrics={t: json.loads((experts[t] / "metrics.json").read_text()) for t in order},
        config=config, cfg=bert.BertConfig.from_json(folder / "config.json"),
        tokenizer=bert.load_tokenizer(folder, config.max_len))


def merge_and_score(setup: Setup, merge_cfg: dict, data: dict, workdir: Path, name: str) -> dict:
    """One swudi-merge run, then accuracy per task; the merged files are removed afterwards."""
    merged_dir, wall, peak = run_merge(merge_cfg, workdir, name.replace("@", "_at_"))
    try:
        accs = evaluate(bert.load_tensors(merged_dir), setup.heads, data, setup.cfg)
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
    return {"acc": accs, "merge_wall_s": wall, "merge_peak_rss_mib": peak}


def benchmark(cache: Path, out_dir: Path, methods: list[str], calib: int = 256,
              specs: dict[str, TaskSpec | None] | None = None, log=print, resume: bool = False) -> dict:
    """Merge with each of ``methods`` (registry names or ``EXTRA_RUNS`` keys), score on the test
    splits, and write ``minilm.json`` (after every method), ``minilm.png`` and the table.
    ``resume`` keeps the rows of ``methods`` already in ``out_dir/minilm.json`` (made from the
    same cache, tasks and calibration size) instead of merging them again."""
    from swudi_jax.methods import registry

    setup = load_setup(cache, specs, log)
    order = list(setup.tasks)
    test = setup.split("test")
    expert_acc = {t: setup.metrics[t]["expert_test_acc"] for t in order}
    pretrained_acc = {t: setup.metrics[t]["pretrained_with_expert_head_test_acc"] for t in order}
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = out_dir / "work"
    workdir.mkdir(exist_ok=True)
    rows = {"expert (each on its own task)": {"acc": expert_acc, **summarise(expert_acc, expert_acc)},
            "pretrained + expert head": {"acc": pretrained_acc, **summarise(pretrained_acc, expert_acc)}}
    report = {"tasks": order, "finetune": dataclasses.asdict(setup.config), "calib_examples": calib,
              "test_sizes": {t: int(len(test[t][2])) for t in order}, "expert_metrics": setup.metrics,
              "rows": rows}
    if resume and (out_dir / "minilm.json").is_file():
        previous = json.loads((out_dir / "minilm.json").read_text())
        setup_keys = [k for k in report if k != "rows"]
        same = {k: previous.get(k) for k in setup_keys} == json.loads(json.dumps({k: report[k] for k in setup_keys}))
        if not same:
            raise ValueError(f"--resume: {out_dir / 'minilm.json'} was made from another cache, task set or "
                             f"calibration size; remove it or choose another --out")
        rows.update({k: v for k, v in previous["rows"].items() if k in methods})
    for name in methods:
        method, scale = EXTRA_RUNS.get(name, (name, None))
        if name in rows:
            log(f"[{name}] kept from {out_dir / 'minilm.json'}")
            continue
        log(f"[{name}] merging with swudi-merge ...")
        parameters = RUN_PARAMETERS.get(method, {})
        row = merge_and_score(setup, setup.merge_config(method, scale, parameters, calib), test, workdir, name)
        options = dict(registry.resolve_options(method, parameters))
        row.update(summarise(row["acc"], expert_acc),
                   scale=registry.get_method(method).scale(options) if scale is None else scale, options=options)
        rows[name] = row
        log(f"[{name}] mean acc {row['mean_acc']:.4f}  normalised {row['mean_normalised_acc']:.4f}  "
            f"merge {row['merge_wall_s']:.1f}s {row['merge_peak_rss_mib']:.0f} MiB")
        write_json(out_dir / "minilm.json", report)
    print(markdown_table(report))
    plot(report, out_dir / "minilm.png")
    return report


def markdown_table(report: dict) -> str:
    tasks = report["tasks"]
    head = "| model | " + " | ".join(tasks) + " | mean acc | mean norm. acc | merge time (s) | peak RSS (MiB) |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for name, row in report["rows"].items():
        wall = f"{row['merge_wall_s']:.1f}" if "merge_wall_s" in row else ""
        peak = f"{row['merge_peak_rss_mib']:.0f}" if "merge_peak_rss_mib" in row else ""
        cells = " | ".join(f"{100 * row['acc'][t]:.1f}" for t in tasks)
        lines.append(f"| {name} | {cells} | {100 * row['mean_acc']:.1f} | {100 * row['mean_normalised_acc']:.1f} | "
                     f"{wall} | {peak} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Grouped bars: per-task accuracy of every row, plus the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["rows"])
    groups = report["tasks"] + ["mean"]
    width = 0.85 / len(names)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:len(names)] if len(names) <= 20 else None
    fig, ax = plt.subplots(figsize=(max(9, 1.8 * len(groups) + 0.3 * len(names)), 4.8))
    for i, name in enumerate(names):
        row = report["rows"][name]
        vals = [row["acc"][t] for t in report["tasks"]] + [row["mean_acc"]]
        ax.bar(np.arange(len(groups)) + (i - len(names) / 2 + 0.5) * width, vals, width, label=name,
               color=None if colours is None else colours[i])
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.3, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("all-MiniLM-L6-v2 experts merged with swudi-merge")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from swudi_jax.methods import registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder ({DEFAULT_OUT})")
    known = registry.available_methods() + list(EXTRA_RUNS)
    first = [m for m in PREFERRED_ORDER if m in known]
    own = [m for m in known if m in registry.PROJECT_NAMES or m in EXTRA_RUNS]  # mergekit's: by --methods
    parser.add_argument("--methods", nargs="+", default=first + [m for m in own if m not in first], choices=known)
    parser.add_argument("--calib", type=int, default=256, help="examples per task for the data methods' Grams")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an interrupted run's minilm.json (same cache) and merge the rest")
    args = parser.parse_args(argv)
    try:
        benchmark(args.cache, args.out, args.methods, args.calib, log=lambda s: print(s, flush=True),
                  resume=args.resume)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
