"""The YAML config and merge() build the same LeafRules: what the API can do, swudi-merge can."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

import swudi_jax as sj
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.config import ConfigError, load_config
from swudi_jax.model.layout import LeafRules

LAYERS, WIDTH = 3, 6


def scanned_flax_params(rng, scale=0.0, base=None):
    """A Flax model whose blocks are an ``nn.scan`` stack (layer axis 0), as a nested dict."""
    def leaf(*shape):
        return rng.normal(size=shape).astype(np.float32)

    fresh = {"params": {
        "embed": {"embedding": leaf(10, WIDTH)},
        "blocks": {"Dense_0": {"kernel": leaf(LAYERS, WIDTH, 2 * WIDTH), "bias": leaf(LAYERS, 2 * WIDTH)},
                   "Dense_1": {"kernel": leaf(LAYERS, 2 * WIDTH, WIDTH), "bias": leaf(LAYERS, WIDTH)}},
        "attn": {"query": {"kernel": leaf(WIDTH, 2, 3)}, "out": {"kernel": leaf(2, 3, WIDTH)}},
    }}
    if base is None:
        return fresh
    return {"params": {k: {kk: {name: base["params"][k][kk][name] + scale * fresh["params"][k][kk][name]
                                for name in v} if isinstance(v, dict) else base["params"][k][kk] + scale * v
                           for kk, v in d.items()} for k, d in fresh["params"].items()}}


def test_a_scan_checkpoint_merged_by_swudi_merge_equals_the_python_api(tmp_path):
    rng = np.random.default_rng(0)
    base = scanned_flax_params(rng)
    experts = [scanned_flax_params(rng, 0.05, base) for _ in range(3)]
    flat = lambda tree: sj.model.flat.flatten(tree)[0]  # noqa: E731
    ckio.save(tmp_path / "base.msgpack", flat(base))
    for i, expert in enumerate(experts):
        ckio.save(tmp_path / f"e{i}.msgpack", flat(expert))
    rules = {"scan_patterns": ["blocks/*"], "input_axes": {"attn/query/kernel": 1}, "exclude": ["embed/*"]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({
        "base_model": "base.msgpack", "models": [f"e{i}.msgpack" for i in range(3)],
        "merge_method": "swudi", "parameters": {"rank_ratio": 0.5}, "layout": "flax", **rules}))
    out = sj.merge_checkpoints(tmp_path / "merge.yaml", tmp_path / "out", progress=False)
    got = ckio.load(ckio.weights_path(out, "msgpack"))
    want = flat(sj.merge(base, experts, "swudi", layout="flax", rank_ratio=0.5, **rules))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], np.asarray(want[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    # the scanned kernels were merged layer by layer by the method, not averaged
    mean = np.mean([flat(e)["params/blocks/Dense_0/kernel"] for e in experts], axis=0)
    assert not np.allclose(got["params/blocks/Dense_0/kernel"], mean, atol=1e-4)
    np.testing.assert_array_equal(got["params/embed/embedding"], flat(base)["params/embed/embedding"])


def test_the_config_builds_the_leaf_rules_merge_builds(tmp_path):
    ckio.save(tmp_path / "base.safetensors", {"w": np.ones((2, 2), np.float32)})
    for name in ("e1", "e2"):
        ckio.save(tmp_path / f"{name}.safetensors", {"w": np.full((2, 2), 2.0, np.float32)})
    content = {"base_model": "base.safetensors", "models": ["e1.safetensors", "e2.safetensors"],
               "merge_method": "swudi", "layout": "flax", "include": ["a*"], "exclude": "b*",
               "scan_patterns": ["blocks/*"], "scan_axis": 1, "input_axes": {"x/kernel": 2}, "others": "keep"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(content))
    rules = load_config(tmp_path / "m.yaml").leaf_rules()
    assert rules == LeafRules(layout="flax", include="a*", exclude=["b*"], scan_patterns="blocks/*", scan_axis=1,
                              input_axes={"x/kernel": 2}, others="keep")
    for key, bad in (("scan_axis", "one"), ("input_axes", ["x"]), ("input_axes", {"x": 0}), ("multi_device", "yes")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**content, key: bad}))
        with pytest.raises(ConfigError, match=key):
            load_config(tmp_path / "bad.yaml")


def test_leaf_rules_and_keywords_are_not_given_together():
    base = {"w": np.zeros((2, 3), np.float32)}
    experts = [{"w": np.full((2, 3), float(i), np.float32)} for i in (1, 2)]
    with pytest.raises(ValueError, match="not both"):
        sj.merge(base, experts, rules=LeafRules(layout="torch"), exclude="w")
    np.testing.assert_allclose(sj.merge(base, experts, "average", rules=LeafRules(layout="torch"))["w"], 1.5)
