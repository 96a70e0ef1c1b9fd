"""The layer-wise algorithm on a 3-layer Flax MLP: sequential vs one pass, RegMean++, targets."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swudi_jax
from swudi_jax import layer_scores, layerwise_merge, task_grams

LAYERS = ["params/dense_0/kernel", "params/dense_1/kernel", "params/dense_2/kernel"]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, width in enumerate((12, 10, 8)):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            x = nn.gelu(x) if i < 2 else x
        return x


MODEL = MLP()


def apply_mlp(variables, x):
    return MODEL.apply(variables, x)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    base = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 6)))

    def expert():
        return jax.tree.map(lambda a: a + 0.5 * (np.std(a) + 0.05) * rng.normal(size=a.shape).astype(np.float32), base)

    experts = [expert() for _ in range(3)]
    batches = [[rng.normal(size=(16, 6)).astype(np.float32) + 0.5 * k for _ in range(2)] for k in range(3)]
    return base, experts, batches


def own_input_scores(setup, merged):
    """ρ of each layer of ``merged`` on the inputs that layer receives inside ``merged``."""
    base, experts, batches = setup
    return layer_scores(base, experts, merged, task_grams(apply_mlp, merged, batches).mean_grams())


@pytest.mark.parametrize("method, options", [("output_space", {}), ("regmean", {"alpha": 1.0})])
def test_sequential_rho_on_a_three_layer_model_is_at_least_the_one_pass_rho(setup, method, options):
    base, experts, batches = setup
    sequential = layerwise_merge(apply_mlp, base, experts, batches, method=method, inputs="merged", **options)
    one_pass = layerwise_merge(apply_mlp, base, experts, batches, method=method, inputs="experts", **options)
    assert list(sequential.rho) == LAYERS
    # Each version scored on the inputs its layers receive inside its own merged model.
    one_pass_scores = own_input_scores(setup, one_pass.variables)
    assert sequential.rho[LAYERS[0]] == pytest.approx(one_pass_scores[LAYERS[0]], abs=1e-5)  # same inputs
    for path in LAYERS:
        assert 0.0 <= sequential.rho[path] <= 1.0
        assert sequential.rho[path] >= one_pass_scores[path] - 1e-5
    assert np.mean(list(sequential.rho.values())) > np.mean(list(one_pass_scores.values()))
    # The one-pass layer is a feasible point of the sequential layer's problem, so on the
    # sequential model's inputs it captures no more residual energy (exact optimality).
    inputs_of_sequential = task_grams(apply_mlp, sequential.variables, batches).mean_grams()
    reported = layer_scores(base, experts, sequential.variables, inputs_of_sequential)
    feasible = layer_scores(base, experts, one_pass.variables, inputs_of_sequential)
    for path in LAYERS:
        assert reported[path] == pytest.approx(sequential.rho[path], abs=1e-5)
        assert feasible[path] <= reported[path] + 1e-5
    assert feasible[LAYERS[2]] < reported[LAYERS[2]] - 1e-3


@pytest.mark.parametrize("method", ["output_space", "regmean"])
def test_one_pass_equals_the_model_level_merge_with_the_experts_grams(setup, method):
    base, experts, batches = setup
    one_pass = layerwise_merge(apply_mlp, base, experts, batches, method=method, inputs="experts")
    grams = task_grams(apply_mlp, experts, batches).mean_grams()
    merged = swudi_jax.merge(base, experts, method, grams=grams)
    for path in LAYERS:
        module = path.split("/")[1]
        np.testing.assert_allclose(np.asarray(one_pass.variables["params"][module]["kernel"]),
                                   np.asarray(merged["params"][module]["kernel"]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(one_pass.variables["params"][module]["bias"]),
                                   np.mean([np.asarray(e["params"][module]["bias"]) for e in experts], 0),
                                   rtol=1e-5, atol=1e-6)


def test_global_targets_on_the_experts_own_inputs_reduce_to_local_when_biases_agree(setup):
    base, experts, batches = setup
    same_bias = [jax.tree.map(lambda e, b: e, {"params": {k: {"kernel": v["kernel"], "bias": base["params"][k]["bias"]}
                                                         for k, v in ex["params"].items()}}, base) for ex in experts]
    local = layerwise_merge(apply_mlp, base, same_bias, batches, inputs="experts", targets="local")
    global_ = layerwise_merge(apply_mlp, base, same_bias, batches, inputs="experts", targets="global")
    for path in LAYERS:
        assert global_.rho[path] == pytest.approx(local.rho[path], abs=1e-4)
    seq_global = layerwise_merge(apply_mlp, base, experts, batches, inputs="merged", targets="global", basis="energy")
    assert all(0.0 <= r <= 1.0 for r in seq_global.rho.values())


def test_bad_input_is_a_value_error(setup):
    base, experts, batches = setup
    with pytest.raises(ValueError, match="method must be one of"):
        layerwise_merge(apply_mlp, base, experts, batches, method="ties_paper")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpha'\]"):
        layerwise_merge(apply_mlp, base, experts, batches, alpha=0.5)
    with pytest.raises(ValueError, match="3 experts but 2 tasks"):
        layerwise_merge(apply_mlp, base, experts, batches[:2])
    with pytest.raises(ValueError, match="task 2: no calibration batches"):
        layerwise_merge(apply_mlp, base, experts, [*batches[:2], []])
    with pytest.raises(ValueError, match="targets must be one of"):
        layerwise_merge(apply_mlp, base, experts, batches, targets="final")
    wrong = [b[:, :5] for b in batches[1]]
    with pytest.raises(ValueError, match=r"task 1, batch 0: layer 'params/dense_0/kernel'.*feature size 5"):
        layerwise_merge(apply_mlp, base, experts, [batches[0], wrong, batches[2]])
    twins = [experts[0], experts[1], experts[1]]
    with pytest.raises(ValueError, match=r"params/dense_0/kernel: output row \d+ .*tasks \[1, 2\]"):
        layerwise_merge(apply_mlp, base, twins, batches, ridge=0.0)
