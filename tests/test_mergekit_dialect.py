"""The mergekit dialect's plumbing, against hand-computed NumPy: per-model weights, filters and
layer gradients, dtypes (bf16, mixed inputs, out_dtype in config.json), the base among the
models, warnings, tokenizer and chat template, refusals, and mergekit's CLI flags."""

from __future__ import annotations

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import yaml
from mergekit_checkpoints import f64, family, layer_t, llama, run, save_model, write

import swudi_jax as sj
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint import mergekit_config as mk
from swudi_jax.checkpoint.cli import main
from swudi_jax.checkpoint.config import ConfigError, load_config, parse_config, parse_size
from swudi_jax.methods import registry


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_dialect")
    return root, family(root, n_experts=2, seed=1)


# ----------------------------------------------------------------------------- settings


def test_settings_are_evaluated_as_mergekit_does():
    assert mk.evaluate_setting("x", 0.3, 0.7) == 0.3
    assert mk.evaluate_setting("x", [0.0, 1.0, 0.0], 0.25) == pytest.approx(0.5)
    assert mk.evaluate_setting("x", [0.0, 1.0, 0.0], 1.0) == 0.0
    conditions = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "*", "value": 0.2}]
    assert mk.evaluate_setting("model.layers.1.self_attn.q_proj.weight", conditions, 0.5) == pytest.approx(0.5)
    assert mk.evaluate_setting("model.norm.weight", conditions, 1.0) == 0.2
    assert mk.evaluate_setting("model.norm.weight", [{"filter": "mlp", "value": 1.0}], 1.0) is None
    fraction = mk.layer_fractions([f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.norm.weight"])
    assert fraction("model.layers.3.mlp.up_proj.weight", None, 1) == 0.75
    assert fraction("model.embed_tokens.weight", None, 1) == 0.0 and fraction("lm_head.weight", None, 1) == 0.0
    assert fraction("params.scanned", 2, 5) == 0.5  # a scanned stack: the index in the stack


def test_per_model_weight_gradient_and_filtered_global_value(models):
    root, m = models
    m = {k: f64(v) for k, v in m.items()}
    config = {"models": [{"model": "e0", "parameters": {"weight": [1.0, 0.0]}},
                         {"model": "e1", "parameters": {"weight": [{"filter": "mlp", "value": 2.0}]}}],
              "base_model": "base", "merge_method": "task_arithmetic",
              "parameters": {"weight": 0.5, "lambda": [{"filter": "lm_head", "value": 0.0}, {"value": 1.0}]}}
    got = run(root, config, "ta_gradient")
    for name in m["base"]:
        w0 = np.interp(layer_t(name), [0, 1], [1.0, 0.0])
        w1 = 2.0 if "mlp" in name else 0.5  # no match: the global weight
        lam = 0.0 if "lm_head" in name else 1.0
        want = m["base"][name] + lam * (w0 * (m["e0"][name] - m["base"][name]) + w1 * (m["e1"][name] - m["base"][name]))
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_swudi_takes_mergekit_per_model_weights(models):
    root, m = models
    config = {"models": [{"model": "e0", "parameters": {"weight": 0.8}}, {"model": "e1", "parameters": {"weight": 0.4}}],
              "base_model": "base", "merge_method": "swudi", "parameters": {"time": 50.0}}
    got = run(root, config, "swudi_weighted")
    weighted = [{k: m["base"][k] + w * (e[k] - m["base"][k]) for k in m["base"]} for w, e in ((0.8, m["e0"]), (0.4, m["e1"]))]
    want = sj.merge(m["base"], weighted, "swudi", layout="torch", time=50.0)
    for name in m["base"]:
        np.testing.assert_allclose(got[name], np.asarray(want[name]), rtol=2e-5, atol=2e-6, err_msg=name)


# ----------------------------------------------------------------------------- dtypes


def test_bf16_spectral_merge_is_the_float32_merge_rounded_once(tmp_path, capsys):
    bf = family(tmp_path, n_experts=2, seed=2, dtype=ml_dtypes.bfloat16)
    config = {"models": [{"model": "e0"}, {"model": "e1"}], "base_model": "base", "merge_method": "swudi",
              "dtype": "bfloat16"}
    assert any("computes in float32" in n for n in load_config(write(tmp_path, "bf", config)).notes)
    got = run(tmp_path, config, "bf")
    as32 = {k: {n: np.asarray(v, np.float32) for n, v in flat.items()} for k, flat in bf.items()}
    want = sj.merge(as32["base"], [as32["e0"], as32["e1"]], "swudi", layout="torch")
    for name in bf["base"]:
        assert got[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[name], np.asarray(want[name]).astype(ml_dtypes.bfloat16), err_msg=name)
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_dtype_omitted_computes_in_the_stored_dtype_and_float32_is_the_precise_option(tmp_path):
    """mergekit's rule: no ``dtype`` computes bf16 checkpoints in bf16 (the same merge as
    ``dtype: bfloat16``); ``dtype: float32`` with ``out_dtype: bfloat16`` computes in float32
    and rounds once; the spectral methods compute in float32 either way."""
    bf = family(tmp_path, n_experts=2, seed=4, dtype=ml_dtypes.bfloat16)
    ties = {"models": [{"model": "e0", "parameters": {"weight": 0.7, "density": 0.5}},
                       {"model": "e1", "parameters": {"weight": 0.6, "density": 0.7}}],
            "base_model": "base", "merge_method": "ties"}
    stored = run(tmp_path, ties, "stored")
    asked = run(tmp_path, {**ties, "dtype": "bfloat16"}, "asked")
    precise = run(tmp_path, {**ties, "dtype": "float32", "out_dtype": "bfloat16"}, "precise")
    as32 = {k: {n: np.asarray(v, np.float32) for n, v in flat.items()} for k, flat in bf.items()}
    want32 = sj.merge(as32["base"], [as32["e0"], as32["e1"]], "ties", layout="torch", weight=[0.7, 0.6],
                      density=[0.5, 0.7])
    want16 = sj.merge(bf["base"], [bf["e0"], bf["e1"]], "ties", layout="torch", weight=[0.7, 0.6], density=[0.5, 0.7])
    differ = 0
    for name in bf["base"]:
        assert stored[name].dtype == precise[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(stored[name], asked[name], err_msg=name)
        np.testing.assert_array_equal(stored[name], np.asarray(want16[name]), err_msg=name)  # the API's rule too
        np.testing.assert_array_equal(precise[name], np.asarray(want32[name]).astype(ml_dtypes.bfloat16), err_msg=name)
        differ += int(np.any(stored[name] != precise[name]))
    assert differ > 0  # bf16 arithmetic rounds per operation: not the float32 result rounded once
    spectral = {"models": ["e0", "e1"], "base_model": "base", "merge_method": "swudi", "parameters": {"time": 50.0}}
    got = run(tmp_path, spectral, "spectral")
    want = sj.merge(as32["base"], [as32["e0"], as32["e1"]], "swudi", layout="torch", time=50.0)
    for name in bf["base"]:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]).astype(ml_dtypes.bfloat16), err_msg=name)


def test_mixed_dtype_inputs_are_cast_and_out_dtype_sets_torch_dtype(tmp_path):
    rng = np.random.default_rng(3)
    base = llama(rng)
    e0 = {k: (v + 0.1).astype(ml_dtypes.bfloat16) for k, v in base.items()}
    e1 = {k: v - 0.05 for k, v in base.items()}
    for name, flat in (("base", base), ("e0", e0), ("e1", e1)):
        save_model(tmp_path / name, flat)
    config = {"models": [{"model": "e0", "parameters": {"weight": 0.5}}, {"model": "e1", "parameters": {"weight": 1.0}}],
              "base_model": "base", "merge_method": "task_arithmetic", "out_dtype": "bfloat16"}
    got = run(tmp_path, config, "mixed")
    for name in base:
        b = base[name].astype(np.float32)
        want = b + 0.5 * (e0[name].astype(np.float32) - b) + (e1[name] - b)
        np.testing.assert_array_equal(got[name], want.astype(ml_dtypes.bfloat16), err_msg=name)
    assert json.loads((tmp_path / "mixed" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- models, warnings, refusals


def test_base_among_models_is_the_base_and_duplicates_and_experts_equal_to_the_base_warn(models, tmp_path, recwarn):
    root, m = models
    config = load_config(write(root, "habit", {"models": ["base", "e0", "e1"], "base_model": "base",
                                               "merge_method": "ties", "parameters": {"density": 0.5}}))
    assert len(config.models) == 2 and config.model_labels == ("models[1]", "models[2]")
    assert "models[0] is the base model: it is the base, not an expert, as in mergekit" in config.notes
    assert not recwarn.list  # mergekit's own form (its ties examples list the base): a note, no warning
    with pytest.warns(UserWarning, match=r"appears twice among the models \(models\[1\] and models\[2\]\)"):
        load_config(write(root, "twice", {"models": ["base", "e0", "e0"], "base_model": "base", "merge_method": "ties"}))
    shutil.copytree(root / "base", root / "base_copy", dirs_exist_ok=True)
    with pytest.warns(UserWarning, match=r"models\[2\] \(base_copy\) equals the base model in every tensor"):
        run(root, {"models": ["base", "e0", "base_copy"], "base_model": "base", "merge_method": "task_arithmetic"},
            "zero_tv")
    # linear: a configured base joins the inputs, as in mergekit (here with its own weight)
    got = run(root, {"models": [{"model": "base", "parameters": {"weight": 2.0}},
                                {"model": "e0", "parameters": {"weight": 1.0}}],
                     "base_model": "base", "merge_method": "linear"}, "linear_joined")
    name = "model.layers.1.mlp.up_proj.weight"
    want = (2.0 * m["base"][name].astype(np.float64) + m["e0"][name]) / 3.0
    np.testing.assert_allclose(got[name], want, rtol=1e-6)


@pytest.mark.parametrize("config, message", [
    ({"models": ["e0", "e1"], "merge_method": "ties"}, r"`base_model` is required by merge method 'ties'"),
    ({"modules": {"vision_tower": {"slices": [{"sources": [{"model": "e0", "layer_range": [0, 2]}]}]}},
      "merge_method": "passthrough"}, r"the modules of multi-module architectures"),
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "ties", "chat_template": "chatm"},
     r"'chatm' is neither a bundled template \(alpaca, chatml, exaone, llama3, mistral, zephyr\)"),
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "ties", "tokenizer_source": "union",
      "tokenizer": {"source": "union"}}, r"give `tokenizer_source` or `tokenizer`, not both"),
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "task_arithmetic", "out_format": "peft",
      "tokenizer_source": "base"}, r"`tokenizer_source` with `out_format: peft` is not supported: a LoRA adapter"),
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "ties",
      "parameters": {"normalize": [{"filter": "mlp", "value": False}]}}, r"`parameters.normalize` must be one value"),
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "ties",
      "parameters": {"density": [0.5, {"filter": "x"}]}}, r"a list of conditions takes mappings"),
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "slerp", "parameters": {"t": 0.5}},
     r"`models` needs exactly one experts to merge with 'slerp'"),
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "dare_tie"}, r"did you mean 'dare_ties'"),
])
def test_what_is_not_supported_is_refused_with_a_reason(models, config, message):
    root, _ = models
    with pytest.raises(ConfigError, match=message):
        load_config(write(root, "bad", config))


# ----------------------------------------------------------------------------- tokenizer, CLI


def test_tokenizer_source_chat_template_and_the_resolved_config(models, tmp_path):
    root, _ = models
    shutil.copytree(root / "e1", root / "e1t")
    (root / "e1t" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    config = {"models": [{"model": "e0", "parameters": {"weight": 0.5, "density": [0.2, 0.9]}},
                         {"model": "e1t", "parameters": {"weight": 0.5}}],
              "base_model": "base", "merge_method": "ties", "parameters": {"density": 0.6},
              "tokenizer_source": "e1t", "chat_template": "auto"}
    run(root, config, "tok")
    assert (root / "tok" / "tokenizer.json").read_text() == (root / "e1t" / "tokenizer.json").read_text()
    assert json.loads((root / "tok" / "tokenizer_config.json").read_text()) == {"chat_template": "{{ messages }}"}
    # merge_config.yaml keeps the paths as the config wrote them (relative to the config's folder)
    again = parse_config(yaml.safe_load((root / "tok" / "merge_config.yaml").read_text()), base_dir=root)
    assert again.model_parameters == ({"weight": 0.5, "density": [0.2, 0.9]}, {"weight": 0.5})
    assert again.parameters["density"] == 0.6
    # mergekit saves the tokenizer it builds for a tokenizer_source whatever --no-copy-tokenizer says
    assert main([str(root / "tok.yaml"), str(tmp_path / "built"), "--no-copy-tokenizer", "--no-progress"]) == 0
    assert (tmp_path / "built" / "tokenizer.json").exists()
    plain = write(root, "plain", {k: v for k, v in config.items() if k not in ("tokenizer_source", "chat_template")})
    assert main([str(plain), str(tmp_path / "plain"), "--no-copy-tokenizer", "--no-progress"]) == 0
    assert not (tmp_path / "plain" / "tokenizer.json").exists()


def test_mergekit_cli_flags(models, tmp_path, capsys):
    """--out-shard-size as mergekit's parse_kmb: K/M/B are thousands/millions/billions of bytes."""
    root, _ = models
    config = write(root, "cli", {"models": ["e0", "e1"], "base_model": "base", "merge_method": "task_arithmetic"})
    assert main([str(config), str(tmp_path / "a"), "--lazy-unpickle", "--allow-crimes", "--copy-tokenizer",
                 "--out-shard-size", "300", "--no-progress"]) == 0
    bytes_shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert main([str(config), str(tmp_path / "b"), "--out-shard-size", "1K", "--no-progress"]) == 0  # 1000 bytes
    assert main([str(config), str(tmp_path / "c"), "--out-shard-size", "75B", "--no-progress"]) == 0  # 75e9 bytes
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    sizes = {}
    with ckio.open_checkpoint(tmp_path / "b") as reader:
        for key, shard in index["weight_map"].items():
            shape, dtype = reader.shape_dtype(key)
            sizes[shard] = sizes.get(shard, 0) + int(np.prod(shape)) * dtype.itemsize
    assert len(sizes) > 1 and all(size <= 1000 for size in sizes.values())  # bytes: numel × element size
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1 < len(bytes_shards)
    for folder in ("a", "b", "c"):
        np.testing.assert_array_equal(ckio.load(tmp_path / folder)["lm_head.weight"],
                                      ckio.load(tmp_path / "a")["lm_head.weight"])
    assert parse_size("5B", "x") == 5 * 10**9 == load_config(config).out_shard_size  # mergekit's default
    if jax.default_backend() == "cpu":
        capsys.readouterr()
        assert main([str(config), str(tmp_path / "d"), "--cuda"]) == 1
        assert "--cuda: JAX sees no accelerator" in capsys.readouterr().err
        assert not (tmp_path / "d").exists()
    assert "dare_ties" in registry.available_methods()


def test_bf16_task_arithmetic_rounds_each_operation_as_mergekit(tmp_path):
    bf = family(tmp_path, n_experts=2, seed=4, dtype=ml_dtypes.bfloat16)
    config = {"models": [{"model": "e0", "parameters": {"weight": 0.7}}, {"model": "e1", "parameters": {"weight": 0.6}}],
              "base_model": "base", "merge_method": "task_arithmetic", "parameters": {"lambda": 0.9},
              "dtype": "bfloat16"}
    got = run(tmp_path, config, "bf_ta")

    def r(x):  # one bf16 rounding of a float32 result, as each PyTorch bf16 operation does
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)

    for name in bf["base"]:
        b = bf["base"][name].astype(np.float32)
        deltas = [r(r(bf[e][name].astype(np.float32) - b) * r(w)) for e, w in (("e0", 0.7), ("e1", 0.6))]
        want = r(b + r(r(deltas[0] + deltas[1]) * np.float32(0.9)))
        assert got[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[name].astype(np.float32), want, err_msg=name)


def test_per_tensor_values_feed_one_compiled_call_per_group(monkeypatch):
    import dataclasses

    from swudi_jax.methods import mergekit_family as mk_methods

    traced = []

    def counting(tau, *, weight=1.0, normalize=False, lam=1.0):
        traced.append(tau.shape)
        return mk_methods.task_arithmetic(tau, weight=weight, normalize=normalize, lam=lam)

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    spec = sj.register(dataclasses.replace(registry.get_method("task_arithmetic"), name="counting_ta", fn=counting))
    rng = np.random.default_rng(5)
    base = {f"model.layers.{i}.mlp.up_proj.weight": rng.normal(size=(4, 3)).astype(np.float32) for i in range(4)}
    experts = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(2)]

    def per_tensor(path, layer):
        i = mk.layer_index(path)
        return {"weight": [1.0 + i, 0.5], "lam": 0.1 * (i + 1)}

    got = sj.merge(base, experts, spec, layout="torch", tensor_options=per_tensor)
    assert traced == [(2, 4, 3)]  # four layers, four different values, one trace (vmapped)
    for path in base:
        i = mk.layer_index(path)
        want = base[path] + 0.1 * (i + 1) * ((1.0 + i) * (experts[0][path] - base[path]) + 0.5 * (experts[1][path] - base[path]))
        np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"option 'weight' takes one value per expert \(2\)"):
        sj.merge(base, experts, spec, layout="torch", weight=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"option\(s\) \['normalize'\] .* cannot vary per tensor"):
        sj.merge(base, experts, spec, layout="torch", tensor_options=lambda p, l: {"normalize": True})
