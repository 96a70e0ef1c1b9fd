"""The method registry: names, options, defaults, and user-registered methods."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import swudi_jax as sj
from swudi_jax.methods import registry

BUILTIN = ["average", "dare", "pinv", "swudi", "swudi_a", "task_arithmetic_paper", "ties_paper", "wudi"]


def test_every_builtin_method_is_registered_with_its_source():
    names = registry.available_methods()
    assert set(BUILTIN) <= set(names)
    for name in BUILTIN:
        method = registry.get_method(name)
        assert method.name == name and method.kind in registry.KINDS and "arXiv" in method.source


def test_unknown_method_error_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown merge method 'swudy'.*did you mean 'swudi'.*task_arithmetic"):
        registry.get_method("swudy")


def test_unknown_option_error_names_it_and_the_known_options():
    with pytest.raises(ValueError, match=r"\['dens'\].*'ties_paper'.*density.*trim"):
        registry.resolve_options("ties_paper", {"dens": 0.3})


def test_resolved_options_are_defaults_overridden_by_the_user():
    family_off = {"tikhonov_alpha": 0.0, "output_time": None, "consensus_power": 0.0, "consensus_floor": 0.0,
                  "gamma": 1.0, "filter": "exponential", "alignment": 0.0, "alignment_reference": None}  # issue 11
    assert registry.resolve_options("swudi", {"time": 300.0}) == {"time": 300.0, "rank_ratio": 0.65, "init": "sum", "solver": "auto",
                                                                 **family_off, "weight": 1.0}
    assert registry.resolve_options("wudi")["learning_rate"] == 1e-5
    assert registry.resolve_options("dare") == {"drop": 0.9, "rescale": True, "seed": 0, "then": "task_arithmetic"}
    assert registry.resolve_options("ties_paper")["density"] == 0.2 and registry.resolve_options("ties_paper")["trim"] == "model"


@pytest.mark.parametrize("name, options, message", [
    ("ties_paper", {"density": 1.5}, "density"),
    ("ties_paper", {"trim": "layer"}, "trim"),
    ("dare", {"drop": 1.0}, "drop"),
    ("dare", {"then": "average"}, "then"),
    ("dare", {"seed": 1.5}, "seed"),
    ("swudi", {"time": -1.0}, "time"),
    ("swudi", {"rank_ratio": 0.0}, "rank_ratio"),
    ("swudi_a", {"rank_rule": "nope"}, "rank_rule"),
    ("wudi", {"learning_rate": 0.0}, "learning_rate"),
    ("wudi", {"gradient": "exact"}, "gradient"),
    ("swudi", {"solver": "qr"}, "solver"),
    ("swudi_a", {"solver": "qr"}, "solver"),
    ("pinv", {"solver": "qr"}, "solver"),
])
def test_bad_option_values_are_refused_before_compute(name, options, message):
    with pytest.raises(ValueError, match=message):
        registry.resolve_options(name, options)


def test_default_scale_is_point_three_for_task_arithmetic_and_one_otherwise():
    assert registry.default_scale("task_arithmetic_paper") == 0.3
    assert registry.default_scale("dare") == 0.3
    assert registry.default_scale("dare", {"then": "ties"}) == 1.0
    for name in ["average", "ties_paper", "swudi", "swudi_a", "pinv", "wudi"]:
        assert registry.default_scale(name) == 1.0


def test_a_registered_method_merges_through_the_same_call(monkeypatch):
    registry.available_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # undone after the test
    method = sj.register(sj.MethodSpec(
        name="test_max_abs", fn=lambda tau, *, sign=1.0: sign * jnp.max(jnp.abs(tau), axis=0),
        kind="elementwise", defaults={"sign": 1.0}, default_scale=1.0, source="a test"))
    base = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    experts = [{"w": np.full((2, 3), v, np.float32), "b": np.full(3, -v, np.float32)} for v in (1.0, -4.0)]
    merged = sj.merge(base, experts, method="test_max_abs", sign=-1.0)
    np.testing.assert_allclose(merged["w"], -4.0)
    np.testing.assert_allclose(merged["b"], -4.0)
    assert method.name in registry.available_methods()


def test_register_refuses_an_unknown_kind(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    with pytest.raises(ValueError, match="kind"):
        registry.register(registry.MethodSpec("x", lambda t: t, "magic", {}, 1.0, "nowhere"))


def test_solver_option_reaches_the_layer_function_through_merge():
    import numpy as np

    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(4, 64)).astype(np.float32)}
    experts = [{"w": base["w"] + 0.1 * rng.normal(size=(4, 64)).astype(np.float32)} for _ in range(3)]
    full = sj.merge(base, experts, method="swudi", layout="torch", solver="full")["w"]
    lowrank = sj.merge(base, experts, method="swudi", layout="torch", solver="lowrank")["w"]
    np.testing.assert_allclose(np.asarray(lowrank), np.asarray(full), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="solver"):
        sj.merge(base, experts, method="swudi", layout="torch", solver="qr")
