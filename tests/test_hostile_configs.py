"""Issue 20, the config side: every bad option value is refused naming the file, the key and the
model (never "could not convert string to float"); `lambda` with `lam` is refused naming both;
empty tensors ((0, 16), (16, 0)) merge as the empty tensor they are; a checkpoint holding no
tensor is refused naming the model and its folder."""

from __future__ import annotations

import numpy as np
import pytest
from mergekit_checkpoints import family, write

import swudi_jax as sj
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.cli import main
from swudi_jax.checkpoint.config import ConfigError, load_config
from swudi_jax.checkpoint.pipeline import plan_checkpoints


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_configs")
    return root, family(root, n_experts=2, seed=3)


def per_model(method, key, value, **rest):
    return {"models": [{"model": "e0", "parameters": {key: value}}, {"model": "e1", "parameters": {key: 1.0}}],
            "base_model": "base", "merge_method": method, **rest}


@pytest.mark.parametrize("config, where, message", [
    (per_model("swudi", "weight", "abc"), r"`models\[0\].parameters.weight` \(model e0\)",
     r"weight must be a finite number or a list of one per model, got 'abc'"),
    (per_model("wudi", "weight", float("nan")), r"`models\[0\].parameters.weight` \(model e0\)", r"got nan"),
    (per_model("ties", "density", "half"), r"`models\[0\].parameters.density` \(model e0\)", r"got 'half'"),
    (per_model("nuslerp", "weight", [1.0, "x"]), r"`models\[0\].parameters.weight` \(model e0\)", r"got 'x'"),  # a gradient
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "linear", "parameters": {"normalize": "yes"}},
     r"`merge_method`/`parameters`", r"normalize must be true or false, got 'yes'"),
    ({"models": ["e0", "e1"], "merge_method": "karcher", "parameters": {"max_iter": 2.5}},
     r"`merge_method`/`parameters`", r"max_iter must be an integer, got 2.5"),
    ({"models": ["e0", "e1"], "base_model": "base", "merge_method": "swudi",
      "parameters": {"alignment_reference": "abc"}}, r"`merge_method`/`parameters`", r"alignment_reference must be"),
    ({"models": ["e0"], "merge_method": "passthrough", "parameters": {"scale": "x"}},
     r"`merge_method`/`parameters`", r"scale must be a finite number or a list of one per model, got 'x'"),
    ({"models": ["e0"], "merge_method": "passthrough", "parameters": {"scale": [{"filter": "mlp", "value": "x"}]}},
     r"`parameters.scale`", r"scale must be a finite number or a list of one per model, got 'x'"),
])
def test_a_bad_value_is_refused_naming_file_key_and_model(models, capsys, config, where, message):
    root, _ = models
    path = write(root, "bad", config)
    with pytest.raises(ConfigError, match=rf"config {path}: {where}: .*{message}"):
        load_config(path)
    assert main([str(path), str(root / "bad_out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("swudi-merge: error: config ") and "Traceback" not in err
    assert not (root / "bad_out").exists()


def test_the_api_refuses_a_bad_value_by_name(models):
    _, m = models
    with pytest.raises(ValueError, match=r"weight must be a finite number or a list of one per model, got 'abc'"):
        sj.merge(m["base"], [m["e0"], m["e1"]], "swudi", layout="torch", weight="abc")


@pytest.mark.parametrize("where", ["parameters", "models"])
def test_lambda_and_lam_together_are_refused_naming_both(models, where):
    root, _ = models
    both = {"lambda": 0.5, "lam": 0.7}
    config = ({"models": ["e0", "e1"], "parameters": both} if where == "parameters" else
              {"models": [{"model": "e0", "parameters": {"weight": 1.0, **both}}, "e1"]})
    path = write(root, "both", {**config, "base_model": "base", "merge_method": "task_arithmetic"})
    with pytest.raises(ConfigError, match=r"gives both `lambda` and `lam`: they are one option"):
        load_config(path)


@pytest.mark.parametrize("shape", [(0, 16), (16, 0)])
def test_an_empty_weight_merges_as_the_empty_tensor_it_is(tmp_path, capsys, shape):
    rng = np.random.default_rng(0)
    base = {"model.layers.0.mlp.up_proj.weight": rng.normal(size=(8, 8)).astype(np.float32),
            "model.layers.0.mlp.empty.weight": np.zeros(shape, np.float32)}
    experts = [{k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(2)]
    for name, flat in (("base", base), ("e0", experts[0]), ("e1", experts[1])):
        ckio.save(tmp_path / name, flat)
    path = write(tmp_path, "m", {"base_model": "base", "models": ["e0", "e1"], "merge_method": "swudi"})
    kinds = {p.path: p.kind for p in plan_checkpoints(load_config(path)).plans}
    assert kinds == {"model.layers.0.mlp.up_proj.weight": "linear", "model.layers.0.mlp.empty.weight": "keep"}
    assert main([str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    got = ckio.load(tmp_path / "out")
    want = sj.merge(base, experts, "swudi", layout="torch")  # the API plans the same way
    assert got["model.layers.0.mlp.empty.weight"].shape == shape == want["model.layers.0.mlp.empty.weight"].shape
    np.testing.assert_allclose(got["model.layers.0.mlp.up_proj.weight"], want["model.layers.0.mlp.up_proj.weight"],
                               rtol=1e-6)


@pytest.mark.parametrize("role", ["base_model", "models[1]", "first model"])
def test_a_checkpoint_without_tensors_is_refused_naming_the_model_and_folder(models, capsys, role):
    root, _ = models
    (root / "empty").mkdir(exist_ok=True)
    from safetensors.numpy import save_file

    save_file({}, str(root / "empty" / "model.safetensors"))
    config = {"base_model": "base", "models": ["e0", "empty"], "merge_method": "task_arithmetic"}
    if role == "base_model":
        config = {**config, "base_model": "empty", "models": ["e0", "e1"]}
    elif role == "first model":
        config = {"models": ["empty", "e0"], "merge_method": "linear"}
    label = {"first model": "models[0]"}.get(role, role)
    assert main([str(write(root, "empty_model", config)), str(root / "empty_out")]) == 1
    err = capsys.readouterr().err
    assert err == (f"swudi-merge: error: {label}: {root / 'empty'} holds no tensors (safetensors checkpoint with an "
                   "empty tensor list): nothing to merge; is it the model's folder?\n")
    assert not (root / "empty_out").exists()
