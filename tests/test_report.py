"""The merge report: its figures equal NumPy transcriptions of their definitions (float64), it
changes no merged byte, its JSON round-trips, and a run without matplotlib still writes the JSON."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest
import yaml
from conftest import experts_of

import swudi_jax as sj
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.cli import main
from swudi_jax.checkpoint.report_files import REPORT_JSON, REPORT_PNG, REPORT_TEXT, grid_layout, grid_position
from swudi_jax.model.report import LayerReport, MergeReport


def flax_model(rng, dtype=np.float64) -> dict:
    """Flax kernels (in, out): a wide layer (maths 5 × 12: the m × m product of the interference),
    a tall one (9 × 4: its n × n Gram path) and a bias."""
    return {"wide": {"kernel": rng.normal(size=(12, 5)).astype(dtype)},
            "tall": {"kernel": rng.normal(size=(4, 9)).astype(dtype), "bias": rng.normal(size=(9,)).astype(dtype)}}


def numpy_interference(theta: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """wi ‖(θ − τi) τiᵀ‖²_F per task, straight from the definition (design MATH.md §2)."""
    w = 1 / np.maximum(np.sum(tau ** 2, axis=(1, 2)), 1e-12)
    return np.array([w[i] * np.sum(((theta - tau[i]) @ tau[i].T) ** 2) for i in range(len(tau))])


def maths_stacks(base, experts, merged, path):
    """(τ (N, m, n), θm (m, n)) of a Flax kernel in maths layout (W = kernelᵀ)."""
    b = np.asarray(base[path]["kernel"]).T
    tau = np.stack([np.asarray(e[path]["kernel"]).T - b for e in experts])
    return tau, np.asarray(merged[path]["kernel"]).T - b


@pytest.fixture
def models():
    rng = np.random.default_rng(0)
    base = flax_model(rng)
    experts = [jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape), base) for _ in range(3)]
    return base, experts


@pytest.mark.parametrize("method, options", [("swudi", {}), ("ties", {"density": 0.5}), ("ties_paper", {}),
                                             ("dare", {}), ("task_arithmetic_paper", {}), ("linear", {})])
def test_reported_interference_equals_the_objective_in_numpy(models, method, options):
    base, experts = models
    with jax.enable_x64(True):
        merged, report = sj.merge(base, experts, method, report=True, **options)
    by_path = {layer.path: layer for layer in report.layers}
    assert set(by_path) == {"wide/kernel", "tall/kernel"}
    for path in ("wide", "tall"):
        tau, theta = maths_stacks(base, experts, merged, path)
        layer = by_path[f"{path}/kernel"]
        assert layer.shape == theta.shape
        np.testing.assert_allclose(layer.per_task_sum, numpy_interference(tau.sum(0), tau), rtol=1e-10)
        np.testing.assert_allclose(layer.per_task_merged, numpy_interference(theta, tau), rtol=1e-10)
        assert layer.ratio == pytest.approx(numpy_interference(theta, tau).sum() / numpy_interference(tau.sum(0), tau).sum())
    overall = report.overall()
    assert overall["interference_merged"] == pytest.approx(sum(x.interference_merged for x in report.layers))


def test_spectral_figures_equal_the_filter_on_the_numpy_spectrum(models):
    base, experts = models
    time, ratio = 50.0, 0.5
    with jax.enable_x64(True):
        _, report = sj.merge(base, experts, "swudi", report=True, time=time, rank_ratio=ratio)
    for layer in report.layers:
        tau, _ = maths_stacks(base, experts, experts[0], layer.path.split("/")[0])
        w = 1 / np.sum(tau ** 2, axis=(1, 2))
        lam = np.maximum(np.linalg.eigvalsh(sum(w[i] * tau[i].T @ tau[i] for i in range(3))), 1e-8)
        n = tau.shape[2]
        k = int(np.ceil(ratio * n))
        h = np.where(np.arange(n) >= n - k, 1 - np.exp(-lam * time), 0.0)
        s = layer.spectral
        assert s["kept_rank"] == k
        assert s["lambda_max"] == pytest.approx(lam[-1], rel=1e-10)
        assert s["trace_kept"] == pytest.approx(lam[-k:].sum() / lam.sum(), rel=1e-10)
        assert s["effective_rank"] == pytest.approx(h.sum(), rel=1e-10)
        assert layer.kept is None
    with jax.enable_x64(True):  # an expert of weight 0 is not in the merge's C, nor in the report's
        _, weighted = sj.merge(base, experts, "swudi", report=True, weight=[1.0, 0.0, 2.0])
    for layer in weighted.layers:
        tau, _ = maths_stacks(base, experts, experts[0], layer.path.split("/")[0])
        c = sum(tau[i].T @ tau[i] / np.sum(tau[i] ** 2) for i in (0, 2))
        assert layer.spectral["lambda_max"] == pytest.approx(np.linalg.eigvalsh(c)[-1], rel=1e-10)


def test_kept_density_and_sign_conflict_of_a_per_tensor_trim(models):
    base, experts = models
    with jax.enable_x64(True):
        _, report = sj.merge(base, experts, "ties_paper", report=True, trim="tensor", density=0.25)
    for layer in report.layers:
        tau, _ = maths_stacks(base, experts, experts[0], layer.path.split("/")[0])
        flat = tau.reshape(3, -1)
        k = max(1, int(np.floor(0.25 * flat.shape[1])))
        kept = np.where(np.abs(flat) >= np.sort(np.abs(flat), axis=1)[:, -k:][:, :1], flat, 0)
        np.testing.assert_allclose(layer.kept["density"], (kept != 0).mean(1))
        assert layer.kept["sign_conflict"] == pytest.approx(((kept > 0).any(0) & (kept < 0).any(0)).mean())
        assert layer.spectral is None


def test_rho_equals_the_residual_energy_score_for_the_merge_and_each_expert(models):
    base, experts = models
    rng = np.random.default_rng(1)
    grams = {}
    for path, n in (("wide/kernel", 12),):  # tall/kernel has none: not scored
        x = rng.normal(size=(3, n, 20))
        grams[path] = np.einsum("kit,kjt->kij", x, x)
    with jax.enable_x64(True):
        merged = sj.merge(base, experts, "ties", density=0.5)
        report = sj.score(base, experts, merged, grams, method="ties")
        for layer in report.layers:
            tau, theta = maths_stacks(base, experts, merged, layer.path.split("/")[0])
            if layer.path not in grams:
                assert layer.score is None and layer.rho is None
                continue
            g = grams[layer.path]
            assert layer.rho["merged"] == pytest.approx(float(sj.residual_energy_score(theta, tau, g)), rel=1e-9)
            for j in range(3):
                want = float(sj.residual_energy_score(tau[j], tau, g))
                assert layer.rho["experts"][j] == pytest.approx(want, rel=1e-9, abs=1e-12)
    scored = [x for x in report.layers if x.score is not None]
    energy = sum(x.score["energy"] for x in scored)
    assert report.overall()["rho"]["merged"] == pytest.approx(1 - sum(x.score["loss_merged"] for x in scored) / energy)
    assert any("not scored" in note for note in report.notes)
    with pytest.raises(ValueError, match="tall/bias.*not linear weights"):
        sj.score(base, experts, merged, {"tall/bias": np.ones((3, 9, 9))})


def test_report_changes_no_merged_value_and_its_json_round_trips(models, tmp_path):
    base, experts = models
    for method in ("swudi", "dare_ties"):
        plain = sj.merge(base, experts, method)
        merged, report = sj.merge(base, experts, method, report=True)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(merged)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
        assert MergeReport.from_dict(document) == report
        assert MergeReport.from_dict(document).to_dict() == document
    sj.write_report(report, tmp_path)
    assert sj.read_report(tmp_path) == report
    assert report.method == "dare_ties" and report.experts == ("expert 0", "expert 1", "expert 2")


def test_without_matplotlib_the_json_and_table_are_still_written(models, tmp_path, monkeypatch):
    base, experts = models
    _, report = sj.merge(base, experts, "swudi", report=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    message = sj.write_report(report, tmp_path)
    assert "pip install 'swudi_jax[plot]'" in message and REPORT_PNG in message
    assert not (tmp_path / REPORT_PNG).exists()
    assert sj.read_report(tmp_path / REPORT_JSON) == report
    assert "wide/kernel" in (tmp_path / REPORT_TEXT).read_text()


def test_the_picture_is_drawn_with_matplotlib(models, tmp_path):
    pytest.importorskip("matplotlib")
    base, experts = models
    reports = [sj.merge(base, experts, m, report=True)[1] for m in ("swudi", "ties")]
    message = sj.write_report(reports[0], tmp_path)
    assert (tmp_path / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "not drawn" not in message
    fig = sj.report_figure(reports, ["SWUDI", "TIES"])
    assert len(fig.axes) == 8  # two panels and their colour bars per report
    exact = MergeReport("pinv", {}, 1.0, ("a",), (LayerReport("w", None, (4, 4), (1.0,), (0.0,)),))
    assert len(sj.report_figure([exact]).axes) == 2  # a layer with no interference left: ratio 0, drawn


def _layer(path: str, index=None) -> LayerReport:
    return LayerReport(path, index, (4, 4), (1.0,), (0.5,))


def test_grid_puts_layers_down_and_module_types_across():
    llama = [_layer(f"model.layers.{i}.{m}.weight") for i in range(32)
             for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")] + [_layer("model.embed_tokens.weight")]
    labels, cols, cells = grid_layout(MergeReport("swudi", {}, 1.0, ("a",), tuple(llama)))
    assert labels == ["(no layer)"] + [str(i) for i in range(32)]
    assert cols == ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "model.embed_tokens"]
    assert cells[-1] == (0, 3) and cells[0] == (1, 0)
    assert grid_position(_layer("params/blocks/kernel", 3)) == (("", 3), "params.blocks")
    assert grid_position(_layer("encoder.layer.5.attention.self.value.weight")) == (("encoder.layer", 5),
                                                                                   "attention.self.value")
    assert grid_position(_layer("layers/3/attn/q/kernel/value")) == (("layers", 3), "attn.q")  # an NNX state
    two_stacks = [_layer("vision.layers.0.fc.weight"), _layer("text.layers.0.fc.weight")]
    assert grid_layout(MergeReport(None, {}, None, ("a",), tuple(two_stacks)))[0] == ["vision.layers 0", "text.layers 0"]


@pytest.fixture
def on_disk(tmp_path):
    """HF safetensors base + 3 experts, a Grams file for two of the linear weights, a config."""
    rng = np.random.default_rng(0)
    base = {f"model.layers.{i}.mlp.{name}.weight": rng.normal(size=shape).astype(np.float32)
            for i in range(2) for name, shape in (("up_proj", (12, 8)), ("down_proj", (8, 12)))}
    base["model.norm.weight"] = np.ones(8, np.float32)
    ckio.save(tmp_path / "base", base)
    for i, e in enumerate(experts_of(base, rng)):
        ckio.save(tmp_path / f"e{i}", e)
    x = rng.normal(size=(3, 8, 30))
    grams = {f"model.layers.{i}.mlp.up_proj.weight": np.einsum("kit,kjt->kij", x, x).astype(np.float32)
             for i in range(2)}
    ckio.save(tmp_path / "calib.safetensors", grams)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base_model": "base", "models": ["e0", "e1", "e2"], "merge_method": "swudi"}))
    return tmp_path, config


def test_cli_report_and_score_write_the_files_and_change_no_weight_byte(on_disk, capsys):
    root, config = on_disk
    assert main([str(config), str(root / "plain"), "--no-progress"]) == 0
    assert main([str(config), str(root / "reported"), "--no-progress", "--score", str(root / "calib.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "layers with the most interference left" in printed and f"{root / 'reported'}/{REPORT_JSON}" in printed
    weights = [sorted((root / name).glob("*.safetensors")) for name in ("plain", "reported")]
    assert [p.name for p in weights[0]] == [p.name for p in weights[1]]
    for a, b in zip(*weights):
        assert a.read_bytes() == b.read_bytes()
    report = sj.read_report(root / "reported")
    assert report.method == "swudi" and len(report.layers) == 4
    assert {x.path: x.score is not None for x in report.layers} == {
        f"model.layers.{i}.mlp.{name}.weight": name == "up_proj" for i in range(2) for name in ("up_proj", "down_proj")}
    assert report.overall()["rho"]["layers"] == 2
    assert (root / "reported" / REPORT_PNG).exists() == (pytest.importorskip("matplotlib") is not None)
    bad = root / "bad.safetensors"
    ckio.save(bad, {"model.norm.weight": np.ones((3, 8, 8), np.float32)})
    assert main([str(config), str(root / "refused"), "--no-progress", "--score", str(bad)]) == 1
    assert "not linear weights" in capsys.readouterr().err and not (root / "refused").exists()


def _same_weights(a, b) -> None:
    files = [sorted(p.glob("*.safetensors")) for p in (a, b)]
    assert [p.name for p in files[0]] == [p.name for p in files[1]] and files[0]
    for x, y in zip(*files):
        assert x.read_bytes() == y.read_bytes(), x.name


def test_lora_factor_tensors_are_left_out_and_named_and_no_byte_changes(tmp_path):
    """Adapters merged from their factors: the tensors every adapter updates (q, v) have no dense
    task vector; the report leaves them out, naming them, and reports the densified ones."""
    from test_lora_checkpoints import MODULES, PROJ, QV, tiny_llama, write_adapter

    from swudi_jax.checkpoint.pipeline import merge_checkpoints
    rng = np.random.default_rng(0)
    base = tiny_llama(rng)
    ckio.save(tmp_path / "base", base)
    targets = sorted(p.split(".")[-1] for p in PROJ)
    write_adapter(tmp_path / "a1", base, rng, MODULES, {"r": 4, "lora_alpha": 8, "target_modules": targets})
    write_adapter(tmp_path / "a2", base, rng, QV, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base_model": "base", "models": ["a1", "a2"], "merge_method": "swudi"}))
    merge_checkpoints(config, tmp_path / "plain", progress=False)
    merge_checkpoints(config, tmp_path / "reported", progress=False, report=True)
    _same_weights(tmp_path / "plain", tmp_path / "reported")
    report = sj.read_report(tmp_path / "reported")
    factored = {f"{m}.weight" for m in QV}
    reported = {x.path for x in report.layers}
    assert reported and not reported & factored
    assert {f"{m}.weight" for m in MODULES if m not in QV} <= reported
    [note] = [n for n in report.notes if "LoRA factors" in n]
    assert all(p in note for p in factored)
    with pytest.raises(ValueError, match="--report and --score cover merges written as weights"):
        merge_checkpoints(_with(config, out_format="peft"), tmp_path / "adapter", progress=False, report=True)
    assert not (tmp_path / "adapter").exists()


def _with(config, **changes):
    changed = config.with_name(f"changed_{config.name}")
    changed.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), **changes}))
    return changed


def test_distributed_report_is_refused_before_anything_starts(on_disk):
    from swudi_jax.checkpoint.pipeline import merge_checkpoints
    root, config = on_disk
    with pytest.raises(ValueError, match="--report and --score need every layer in one process"):
        merge_checkpoints(config, root / "many", progress=False, distributed=True, report=True)
    assert not (root / "many").exists()


def test_slices_report_the_slices_of_every_model_and_name_the_others(tmp_path):
    """A slice of the base and both experts is reported as the merge of those tensors; a slice of
    the base and one expert is left out (its task columns would name the wrong experts), named."""
    from mergekit_checkpoints import family

    from swudi_jax.checkpoint.pipeline import merge_checkpoints
    m = family(tmp_path, n_experts=2)
    config = tmp_path / "sliced.yaml"
    config.write_text(yaml.safe_dump({"slices": [
        {"sources": [{"model": s, "layer_range": [0, 2]} for s in ("base", "e0", "e1")]},
        {"sources": [{"model": s, "layer_range": [2, 3]} for s in ("base", "e0")]}],
        "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32"}))
    merge_checkpoints(config, tmp_path / "plain", progress=False)
    merge_checkpoints(config, tmp_path / "reported", progress=False, report=True)
    _same_weights(tmp_path / "plain", tmp_path / "reported")
    report = sj.read_report(tmp_path / "reported")
    layers = {x.path.split(".")[2] for x in report.layers if x.path.startswith("model.layers.")}
    assert layers == {"0", "1"} and "model.embed_tokens.weight" in {x.path for x in report.layers}  # the first slice's
    [note] = [n for n in report.notes if "a slice merging other models" in n]
    assert "model.layers.2.self_attn.q_proj.weight" in note
    layer = next(x for x in report.layers if x.path == "model.layers.1.mlp.up_proj.weight")
    w0 = m["base"][layer.path].astype(np.float64)  # torch's (out, in): the maths layout
    tau = np.stack([m[e][layer.path].astype(np.float64) - w0 for e in ("e0", "e1")])
    merged = ckio.load(tmp_path / "plain")[layer.path].astype(np.float64) - w0
    np.testing.assert_allclose(layer.per_task_merged, numpy_interference(merged, tau), rtol=1e-3)
