"""The built-in demo: offline tasks, distinct experts, a complete table (quick mode only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from swudi_jax.demo import (  # noqa: E402  (after the optional-dependency skip)
    QUICK,
    DemoConfig,
    QUICK_METHODS,
    TASK_NAMES,
    format_table,
    indistinct_experts,
    main,
    make_pretraining_task,
    make_tasks,
    run_demo,
)
from swudi_jax.demo.model import build_model, dense_layers, init_backbone  # noqa: E402


@pytest.fixture(scope="module")
def quick_results():
    return run_demo(QUICK, list(QUICK_METHODS))


def test_tasks_are_deterministic_distinct_and_share_one_split():
    first, again = make_tasks(0, n_tasks=len(TASK_NAMES)), make_tasks(0, n_tasks=len(TASK_NAMES))
    pre = make_pretraining_task(0)
    assert [t.name for t in first] == list(TASK_NAMES)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)
    for task in first:
        assert task.x_train.dtype == np.float32 and task.x_train.shape[1] == 64
        assert task.x_train.shape[0] == pre.x_train.shape[0] and task.x_test.shape[0] == pre.x_test.shape[0]
        assert set(np.unique(task.y_train)) == set(range(task.n_classes))
        assert not np.array_equal(task.x_train, pre.x_train)  # every task transforms the images
    for i, a in enumerate(first):
        for b in first[i + 1:]:
            assert not np.allclose(a.x_train, b.x_train), (a.name, b.name)
    # Train and test images never overlap: the split is a partition of the digits.
    assert pre.x_train.shape[0] + pre.x_test.shape[0] == 1797


def test_make_tasks_rejects_a_bad_task_count():
    with pytest.raises(ValueError, match="n_tasks"):
        make_tasks(0, n_tasks=1)
    with pytest.raises(ValueError, match="n_tasks"):
        make_tasks(0, n_tasks=len(TASK_NAMES) + 1)


def test_dense_layers_lists_backbone_kernels_in_forward_order():
    import jax

    model = build_model((16, 8, 4))
    params = init_backbone(model, jax.random.PRNGKey(0), 64)
    assert dense_layers(params) == ["params/dense_0/kernel", "params/dense_1/kernel", "params/dense_2/kernel"]


def test_quick_demo_table_has_every_requested_method_and_valid_accuracies(quick_results):
    names = [row["name"] for row in quick_results["rows"]]
    n = QUICK.n_tasks
    assert names[0] == "pretrained"
    assert names[1:1 + n] == [f"expert {t}" for t in quick_results["tasks"]]
    for method in QUICK_METHODS:
        assert method in names
    assert "task_arithmetic_paper (scale 1)" in names
    for row in quick_results["rows"]:
        acc = np.asarray(row["accuracy"])
        assert acc.shape == (n,) and np.all((acc >= 0) & (acc <= 1)), row
        assert row["mean"] == pytest.approx(acc.mean())
    table = format_table(quick_results)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned columns
    for name in names:
        assert any(line.startswith(name + " ") for line in lines)


def test_quick_demo_experts_are_each_best_on_their_own_task(quick_results):
    rows = quick_results["rows"]
    n = QUICK.n_tasks
    pretrained = np.asarray(rows[0]["accuracy"])
    experts = np.asarray([row["accuracy"] for row in rows[1:1 + n]])
    for j in range(n):
        others = np.append(np.delete(experts[:, j], j), pretrained[j])
        assert experts[j, j] >= others.max() + QUICK.margin, (quick_results["tasks"][j], experts[:, j])
        assert experts[j, j] > 0.8
    assert quick_results["experts_distinct"] and quick_results["problems"] == []


def test_normalised_accuracy_divides_by_each_tasks_expert(quick_results):
    rows = quick_results["rows"]
    reference = np.diag([row["accuracy"] for row in rows[1:1 + QUICK.n_tasks]])
    for row in rows:
        expected = np.mean(np.asarray(row["accuracy"]) / reference)
        assert row["normalised_mean"] == pytest.approx(expected)


def test_indistinct_experts_names_the_task_whose_expert_does_not_lead():
    pretrained = np.array([0.2, 0.3])
    experts = np.array([[0.9, 0.5], [0.3, 0.52]])  # expert 2 barely beats expert 1 on task 2
    problems = indistinct_experts(pretrained, experts, ["a", "b"], 0.05)
    assert len(problems) == 1 and problems[0].startswith("b:")
    assert indistinct_experts(pretrained, experts, ["a", "b"], 0.0) == []


def test_run_demo_warns_when_fine_tuning_leaves_the_experts_alike():
    barely_trained = DemoConfig(features=(8,), n_tasks=2, pretrain_steps=5, finetune_steps=1)
    with pytest.warns(RuntimeWarning, match="not clearly best on their own tasks"):
        results = run_demo(barely_trained, ["average"])
    assert not results["experts_distinct"] and results["problems"]


def test_main_prints_the_table_and_writes_json(tmp_path, capsys, monkeypatch, quick_results):
    calls = []

    def fake_run_demo(config, methods, log=None):  # the training itself is tested above
        calls.append((config, methods))
        return quick_results

    monkeypatch.setattr("swudi_jax.demo.run.run_demo", fake_run_demo)
    out = tmp_path / "demo.json"
    assert main(["--quick", "--methods", "average", "swudi", "--json", str(out)]) == 0
    assert calls == [(QUICK, ["average", "swudi"])]
    printed = capsys.readouterr().out
    assert format_table(quick_results) in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(quick_results))
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_main_rejects_an_unknown_method_before_training(capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--methods", "not_a_method"])
    assert "not_a_method" in capsys.readouterr().err
