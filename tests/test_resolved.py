"""The resolved method travels: one resolution at the boundary, the same value on every path.

A spec that was never registered must work wherever a registered one does: that is the
test that nothing below the boundary looks a method up by name again.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import swudi_jax as sj
from swudi_jax.methods import registry
from swudi_jax.model import merger


def _unregistered(name: str, like: str) -> sj.MethodSpec:
    spec = dataclasses.replace(registry.get_method(like), name=name, aliases=())
    assert name not in registry.available_methods()
    return spec


def _models(seed=0, n=3):
    rng = np.random.default_rng(seed)
    base = {"dense": {"kernel": rng.normal(size=(12, 10)).astype(np.float32),
                      "bias": rng.normal(size=(10,)).astype(np.float32)}}
    experts = [jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(n)]
    return base, experts


def test_resolve_makes_one_immutable_value_with_the_methods_scale():
    resolved = sj.resolve("task_arithmetic_paper")
    assert isinstance(resolved, sj.Resolved) and resolved.spec is registry.get_method("task_arithmetic_paper")
    assert resolved.scale == 0.3 and sj.resolve("task_arithmetic").scale == 1.0
    assert sj.resolve("dare", {"then": "ties"}).scale == 1.0 and sj.resolve("swudi", scale=0.5).scale == 0.5
    with pytest.raises(TypeError):
        resolved.options["lam"] = 2.0  # read-only
    assert sj.resolve(resolved) is resolved
    with pytest.raises(ValueError, match="already resolved"):
        sj.resolve(resolved, {"lam": 1.0})
    with pytest.raises(ValueError, match="scale must be a finite number"):
        sj.resolve("swudi", scale=float("nan"))


def test_an_unregistered_spec_merges_like_its_registered_twin_on_every_in_memory_path():
    base, experts = _models()
    spec = _unregistered("my_swudi", "swudi")
    want = sj.merge(base, experts, "swudi", rank_ratio=0.5)
    for method in (spec, spec.bind({"rank_ratio": 0.5})):
        kwargs = {} if isinstance(method, sj.Resolved) else {"rank_ratio": 0.5}
        got = sj.merge(base, experts, method, **kwargs)
        np.testing.assert_allclose(got["dense"]["kernel"], want["dense"]["kernel"], rtol=1e-6, atol=1e-6)
        sharded = sj.merge(base, experts, method, multi_device=True, **kwargs)  # the row-sharded path
        np.testing.assert_allclose(sharded["dense"]["kernel"], want["dense"]["kernel"], rtol=1e-5, atol=1e-5)
    tau = np.stack([(e["dense"]["kernel"] - base["dense"]["kernel"]).T for e in experts])
    dense = np.asarray(sj.swudi(tau, rank_ratio=0.5))
    np.testing.assert_allclose(sj.merge_sharded(tau, sj.make_row_mesh(), spec, rank_ratio=0.5), dense,
                               rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(1)
    factors = [(rng.normal(size=(10, 2)).astype(np.float32), rng.normal(size=(2, 12)).astype(np.float32))
               for _ in range(3)]
    np.testing.assert_allclose(sj.merge_lora(factors, spec.bind({"rank_ratio": 0.5})),
                               sj.merge_lora(factors, "swudi", rank_ratio=0.5), rtol=1e-5, atol=1e-6)


def test_an_unregistered_spec_with_a_whole_model_pass_runs_it_once_at_the_boundary():
    base, experts = _models(2)
    spec = _unregistered("my_ties", "ties_paper")
    want = sj.merge(base, experts, "ties_paper")
    got = sj.merge(base, experts, spec)
    np.testing.assert_array_equal(got["dense"]["kernel"], want["dense"]["kernel"])
    plans = sj.plan_tree({"k": ((12, 10), np.float32)}, layout="flax")
    flats = [{"k": e["dense"]["kernel"]} for e in experts]
    chunks = merger.model_task_vector_chunks(plans, {"k": base["dense"]["kernel"]}, flats)
    prepared = merger.prepare(spec.bind(), chunks)
    assert prepared.spec is spec and spec.preparation(prepared.options) is None
    out = sj.merge_group(plans, {"k": base["dense"]["kernel"]}, flats, prepared)
    np.testing.assert_array_equal(np.asarray(out["k"]), np.asarray(sj.merge(
        {"k": base["dense"]["kernel"]}, flats, "ties_paper")["k"]))


def test_merge_group_refuses_a_method_name():
    plans = sj.plan_tree({"k": ((2, 2), np.float32)}, layout="torch")
    with pytest.raises(ValueError, match="takes a resolved method"):
        sj.merge_group(plans, {"k": np.zeros((2, 2), np.float32)}, [{"k": np.ones((2, 2), np.float32)}] * 2, "swudi")


def test_an_unregistered_spec_merges_checkpoints_from_disk_like_its_registered_twin(tmp_path):
    from safetensors.numpy import load_file, save_file

    from swudi_jax.checkpoint.config import parse_config
    rng = np.random.default_rng(3)
    base = {"layer.weight": rng.normal(size=(10, 12)).astype(np.float32),
            "layer.bias": rng.normal(size=(10,)).astype(np.float32)}
    for name, tensors in [("base", base)] + [(f"e{i}", {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32)
                                                       for k, v in base.items()}) for i in range(3)]:
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    spec = _unregistered("my_swudi_disk", "swudi")
    outputs = []
    for method in ("swudi", spec):
        raw = {"base_model": "base", "models": ["e0", "e1", "e2"], "merge_method": method,
               "parameters": {"rank_ratio": 0.5}}
        config = parse_config(raw, base_dir=tmp_path)
        assert config.method.spec is registry.get_method("swudi") if method == "swudi" else config.method.spec is spec
        out = tmp_path / f"out_{len(outputs)}"
        sj.merge_checkpoints(config, out, progress=False)
        outputs.append(load_file(str(out / "model.safetensors")))
    for key in base:
        np.testing.assert_array_equal(outputs[0][key], outputs[1][key])
