"""mergekit's ``slices:`` and ``modules:`` as published configs use them (frankenmerges, SOLAR-style
depth up-scaling, per-slice parameters, sources with their own layer ranges), run by swudi-merge
on small Llama-shaped checkpoints and checked tensor by tensor against NumPy references of
mergekit 0.1.5's plan (``mergekit/plan.py``), written out below independently of the package."""

from __future__ import annotations

import json
import shutil

import mergekit_reference as ref
import numpy as np
import pytest
import yaml
from mergekit_checkpoints import LAYERS, f64, family, run, save_model

from swudi_jax.checkpoint.config import ConfigError, load_config, parse_config
from swudi_jax.checkpoint.pipeline import merge_checkpoints

SUFFIXES = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
            "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
BEFORE, AFTER = ("model.embed_tokens.weight",), ("model.norm.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_slices")
    return root, {k: f64(v) for k, v in family(root).items()}


def expected_layers(slices):
    """mergekit's layer plan: [(output name, slice index, j, n, [(model, source name), ...])];
    ``slices`` is a list of [(model, start, end), ...] per slice. Output layer k is layer j of
    its slice; each source gives its layer start + j."""
    rows, k = [], 0
    for s, sources in enumerate(slices):
        n = sources[0][2] - sources[0][1]
        for j in range(n):
            for suffix in SUFFIXES:
                inputs = [(m, f"model.layers.{start + j}.{suffix}") for m, start, _ in sources]
                rows.append((f"model.layers.{k}.{suffix}", s, j, n, inputs))
            k += 1
    return rows


def check(got, want):
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(got[name], np.float64), value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_passthrough_frankenmerge_of_two_models(models):
    root, m = models
    config = {"slices": [{"sources": [{"model": "e0", "layer_range": [0, 2]}], "parameters": {"weight": 0.5}},
                         {"sources": [{"model": "e1", "layer_range": [1, 3]}]}],
              "merge_method": "passthrough", "dtype": "float32"}
    with pytest.warns(UserWarning, match=r"\['weight'\] are not options of 'passthrough' .* ignored"):
        got = run(root, config, "franken")
    want = {name: m[model][source] for name, _, _, _, [(model, source)] in
            expected_layers([[("e0", 0, 2)], [("e1", 1, 3)]])}
    want.update({n: m["e0"][n] for n in BEFORE})  # before the layers: the first slice's
    want.update({n: m["e1"][n] for n in AFTER})   # after: the last slice's
    check(got, want)
    content = json.loads((root / "franken" / "config.json").read_text())
    assert content["num_hidden_layers"] == 4 and content["hidden_size"] == 8  # the first source's, layers updated
    written = yaml.safe_load((root / "franken" / "merge_config.yaml").read_text())
    assert written["slices"][1] == {"sources": [{"model": "e1", "layer_range": [1, 3]}]}
    assert "parameters" not in written["slices"][0]  # what has no effect is not written back
    again = parse_config(written, base_dir=root)  # paths as the config wrote them: relative to its folder
    with pytest.warns(UserWarning, match="are not options"):
        assert again.modules == load_config(root / "franken.yaml").modules


def test_solar_depth_up_scaling_with_a_scale_filter(models, tmp_path):
    """SOLAR-style: one model's layers stacked with an overlap (layer 1 twice), the second
    slice's attention and MLP outputs zeroed by a filtered per-slice `scale`; config.json's
    count and its per-layer `layer_types` follow the output's layers."""
    root, m = models
    shutil.copytree(root / "base", tmp_path / "typed")
    (tmp_path / "typed" / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": LAYERS, "layer_types": ["a", "b", "c"]}))
    scale = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
    config = {"slices": [{"sources": [{"model": str(tmp_path / "typed"), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(tmp_path / "typed"), "layer_range": [1, 3]}],
                          "parameters": {"scale": scale}}],
              "merge_method": "passthrough", "dtype": "float32"}
    got = run(root, config, "solar")
    want = {}
    for name, s, _, _, [(_, source)] in expected_layers([[("base", 0, 2)], [("base", 1, 3)]]):
        zero = s == 1 and ("o_proj" in name or "down_proj" in name)
        want[name] = 0.0 * m["base"][source] if zero else m["base"][source]
    want.update({n: m["base"][n] for n in BEFORE + AFTER})
    check(got, want)
    content = json.loads((root / "solar" / "config.json").read_text())
    assert content["num_hidden_layers"] == 4 and content["layer_types"] == ["a", "b", "b", "c"]


def test_slerp_per_slice_t_and_layer_fractions(models):
    """t from each slice's parameters, its gradient at j/(n − 1) within the slice (1 for a
    one-layer slice); embeddings from the first slice at t = 0, norm and head from the last."""
    root, m = models
    config = {"slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "e0", "layer_range": [0, 2]}],
                          "parameters": {"t": [0.1, 0.9]}},
                         {"sources": [{"model": "base", "layer_range": [2, 3]}, {"model": "e0", "layer_range": [2, 3]}],
                          "parameters": {"t": [0.2, 0.6]}}],
              "merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5}, "dtype": "float32"}
    got = run(root, config, "slerp_slices")
    want = {}
    grids = [[0.1, 0.9], [0.2, 0.6]]
    for name, s, j, n, [(_, b), (_, e)] in expected_layers([[("base", 0, 2), ("e0", 0, 2)],
                                                           [("base", 2, 3), ("e0", 2, 3)]]):
        t = np.interp(j / (n - 1) if n > 1 else 1.0, np.linspace(0, 1, 2), grids[s])
        want[name] = ref.slerp(t, m["base"][b], m["e0"][e])
    want.update({n: ref.slerp(0.1, m["base"][n], m["e0"][n]) for n in BEFORE})
    want.update({n: ref.slerp(0.2, m["base"][n], m["e0"][n]) for n in AFTER})
    check(got, want)


def test_slerp_between_sources_with_different_ranges(models):
    root, m = models
    config = {"slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "e0", "layer_range": [1, 3]}]}],
              "merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.3}, "dtype": "float32"}
    got = run(root, config, "slerp_shifted")
    want = {name: ref.slerp(0.3, m["base"][b], m["e0"][e])
            for name, _, _, _, [(_, b), (_, e)] in expected_layers([[("base", 0, 2), ("e0", 1, 3)]])}
    want.update({n: ref.slerp(0.3, m["base"][n], m["e0"][n]) for n in BEFORE + AFTER})
    check(got, want)
    assert json.loads((root / "slerp_shifted" / "config.json").read_text())["num_hidden_layers"] == 2


def test_task_arithmetic_with_shifted_ranges_and_filters_on_source_and_output_names(models):
    """A per-model option's filter reads the source tensor's name (e1's layer 2 is output layer
    1); a per-tensor option's reads the output's (lambda on output layer 1)."""
    root, m = models
    config = {"slices": [{"sources": [
        {"model": "base", "layer_range": [1, 3]},
        {"model": "e0", "layer_range": [0, 2], "parameters": {"weight": 0.5}},
        {"model": "e1", "layer_range": [1, 3],
         "parameters": {"weight": [{"filter": "layers.2.", "value": 0.1}, {"value": 0.8}]}}]}],
        "merge_method": "task_arithmetic", "base_model": "base",
        "parameters": {"lambda": [{"filter": "layers.1.", "value": 0.5}, {"value": 1.0}]}, "dtype": "float32"}
    got = run(root, config, "ta_shifted")
    want = {}
    rows = expected_layers([[("base", 1, 3), ("e0", 0, 2), ("e1", 1, 3)]])
    for name, _, _, _, [(_, b), (_, e0), (_, e1)] in rows:
        tau = np.stack([m["e0"][e0] - m["base"][b], m["e1"][e1] - m["base"][b]])
        weights = [0.5, 0.1 if "layers.2." in e1 else 0.8]
        lam = 0.5 if "layers.1." in name else 1.0
        want[name] = m["base"][b] + ref.task_family("task_arithmetic", tau, weights, lam=lam)
    for n in BEFORE + AFTER:
        tau = np.stack([m["e0"][n] - m["base"][n], m["e1"][n] - m["base"][n]])
        want[n] = m["base"][n] + ref.task_family("task_arithmetic", tau, [0.5, 0.8])
    check(got, want)


def test_modules_default_with_models_and_module_parameters(models):
    """``modules: {default: ...}``: a module's ``models:`` takes each model's whole range (the
    base added, as mergekit does); its ``parameters`` sit between the slice's and the global ones."""
    root, m = models
    config = {"modules": {"default": {"models": [{"model": "e0", "parameters": {"weight": 0.3}},
                                                 {"model": "e1", "parameters": {"weight": 0.6}}],
                                      "parameters": {"lambda": 0.7}}},
              "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 2.0},
              "dtype": "float32"}
    got = run(root, config, "module_models")
    want = {n: m["base"][n] + ref.task_family("task_arithmetic", np.stack([m["e0"][n] - m["base"][n],
                                                                           m["e1"][n] - m["base"][n]]),
                                              [0.3, 0.6], lam=0.7) for n in m["base"]}
    check(got, want)
    written = parse_config(yaml.safe_load((root / "module_models" / "merge_config.yaml").read_text()), base_dir=root)
    assert written.modules == load_config(root / "module_models.yaml").modules


def test_the_last_slice_pairs_as_many_sources_as_the_first(models):
    """mergekit zips the last slice's sources with the first slice's inputs: the final norm and
    head come from the last slice's first two sources (warned)."""
    root, m = models
    config = {"slices": [{"sources": [{"model": "base", "layer_range": [0, 1]}, {"model": "e0", "layer_range": [0, 1]}]},
                         {"sources": [{"model": "base", "layer_range": [1, 3]}, {"model": "e0", "layer_range": [1, 3]},
                                      {"model": "e1", "layer_range": [1, 3]}]}],
              "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32"}
    with pytest.warns(UserWarning, match="from the last slice's first 2 sources only"):
        got = run(root, config, "zipped")
    for n in AFTER:
        np.testing.assert_allclose(got[n], m["e0"][n], rtol=1e-6, atol=1e-6)
    name = "model.layers.2.mlp.up_proj.weight"
    tau = np.stack([m["e0"][name] - m["base"][name], m["e1"][name] - m["base"][name]])
    np.testing.assert_allclose(got[name], m["base"][name] + tau.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config, message", [
    ({"modules": {"text_decoder": {"slices": [{"sources": [{"model": "e0", "layer_range": [0, 2]}]}]}},
      "merge_method": "passthrough"}, r"`modules.text_decoder`: the modules of multi-module architectures .* not known"),
    ({"slices": [{"sources": [{"model": "e0", "layer_range": [0, 2]}, {"model": "e1", "layer_range": [0, 3]}]}],
      "merge_method": "linear"}, r"every source of a slice must take the same number of layers"),
    ({"slices": [{"sources": [{"model": "e0", "layer_range": [0, 2]}, {"model": "e1", "layer_range": [0, 2]}]}],
      "merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5}},
     r"the base model is not among the slice's sources"),
    ({"slices": [{"sources": [{"model": "e0", "layer_range": [0, 1]}, {"model": "e0", "layer_range": [1, 2]}]}],
      "merge_method": "linear"}, r"a model appears twice among the slice's sources"),
    ({"slices": [{"sources": [{"model": "e0", "layer_range": [0, 2]}, {"model": "e1", "layer_range": [0, 2]}]}],
      "merge_method": "passthrough"}, r"'passthrough' takes exactly 1 model\(s\) per slice, got 2"),
    ({"slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "e0", "layer_range": [0, 2]}],
                  "parameters": {"normalize": True}}], "base_model": "base", "merge_method": "ties"},
     r"parameters.normalize: one value for the whole model"),
    ({"slices": [{"sources": [{"model": "e0", "layer_range": [2, 2]}]}], "merge_method": "passthrough"},
     r"needs 0 <= start < end"),
    ({"slices": [{"sources": [{"model": "e0"}]}], "merge_method": "passthrough"}, r"`layer_range` is required"),
    ({"slices": [{"sources": [{"model": "base", "layer_range": [0, 3]}, {"model": "e0", "layer_range": [0, 3]},
                              {"model": "e1", "layer_range": [0, 3]}]}], "base_model": "base",
      "merge_method": "regmean", "grams": "base"}, r"'regmean' reads input Grams .* does not take `slices`"),
    ({"slices": [{"sources": [{"model": "e0", "layer_range": [0, 2]}]}], "models": ["e0"],
      "merge_method": "passthrough"}, r"give one of `models`, `slices` or `modules`"),
])
def test_what_mergekit_means_differently_or_is_not_known_is_refused(models, config, message):
    root, _ = models
    path = root / "refused.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_ranges_and_stacks_refused_at_planning(models, tmp_path):
    root, m = models
    config = {"slices": [{"sources": [{"model": "e0", "layer_range": [1, 4]}]}], "merge_method": "passthrough"}
    with pytest.raises(ValueError, match=r"layer_range \[1, 4\] goes past the 3 layers of"):
        run(root, config, "past")
    assert not (root / "past").exists()
    # two layer stacks (an encoder and a decoder): mergekit's `modules:` form, not known here
    two = {**{k.replace("model.", "encoder."): v for k, v in m["e0"].items()},
           **{k.replace("model.", "decoder."): v for k, v in m["e0"].items() if "layers" in k}}
    save_model(tmp_path / "encdec", {k: v.astype(np.float32) for k, v in two.items()})
    config = {"slices": [{"sources": [{"model": str(tmp_path / "encdec"), "layer_range": [0, 2]}]}],
              "merge_method": "passthrough"}
    with pytest.raises(ValueError, match=r"one stack of numbered layers .* found \['decoder.layers', "
                                         r"'encoder.layers'\] \(a multi-module model"):
        run(root, config, "encdec_out")
    # a tensor outside the layers whose name tells neither before nor after, where the first
    # and last slices differ
    for name in ("e0", "e1"):
        flat = {k: v.astype(np.float32) for k, v in m[name].items()}
        save_model(tmp_path / f"{name}_x", {**flat, "model.mystery": np.ones(2, np.float32)})
    config = {"slices": [{"sources": [{"model": str(tmp_path / "e0_x"), "layer_range": [0, 1]}]},
                         {"sources": [{"model": str(tmp_path / "e1_x"), "layer_range": [1, 2]}]}],
              "merge_method": "passthrough"}
    with pytest.raises(ValueError, match=r"cannot tell whether 'model.mystery' .* comes before or after"):
        run(root, config, "mystery")


def test_dry_run_and_card_name_the_slices(models, capsys):
    root, _ = models
    config = {"slices": [{"sources": [{"model": "e0", "layer_range": [0, 2]}]},
                         {"sources": [{"model": "e1", "layer_range": [1, 3]}]}], "merge_method": "passthrough"}
    path = root / "dry.yaml"
    path.write_text(yaml.safe_dump(config))
    merge_checkpoints(path, root / "dry_out", dry_run=True, progress=False)
    out = capsys.readouterr().out
    assert "4 output layers" in out and "slice 1: output layers 2-3 from e1 [1, 3)" in out
    assert not (root / "dry_out").exists()
