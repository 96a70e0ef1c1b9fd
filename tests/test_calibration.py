"""Gram capture for Flax models: batch-by-batch sums, paths, token counts and bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from swudi_jax import task_grams
from swudi_jax.model.calibration import dense_io, input_grams, layer_order


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc")(jnp.tanh(x))


class Net(nn.Module):
    """Nested modules, a Dense applied twice (shared weights) and token-shaped inputs."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(6, name="embed")(x))
        h = Block(name="block")(h)
        shared = nn.Dense(5, name="shared")
        return shared(shared(h))


NET = Net()


def apply_net(variables, x):
    return NET.apply(variables, x)


def variables(seed=0):
    return NET.init(jax.random.PRNGKey(seed), jnp.zeros((1, 2, 4)))


def batches(seed, count, n=4):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 2, n)).astype(np.float32) for _ in range(count)]


def all_inputs(v, xs):
    """Every Dense layer's inputs on all batches at once, by plain NumPy forward passes."""
    p = v["params"]
    x = np.concatenate(xs).reshape(-1, 4).astype(np.float64)
    h0 = x
    h1 = np.maximum(h0 @ np.asarray(p["embed"]["kernel"]) + np.asarray(p["embed"]["bias"]), 0)
    h2_in = np.tanh(h1)
    h2 = h2_in @ np.asarray(p["block"]["fc"]["kernel"]) + np.asarray(p["block"]["fc"]["bias"])
    h3 = h2 @ np.asarray(p["shared"]["kernel"]) + np.asarray(p["shared"]["bias"])
    return {"params/embed/kernel": h0, "params/block/fc/kernel": h2_in,
            "params/shared/kernel": np.concatenate([h2, h3])}


def test_grams_accumulated_over_batches_equal_the_gram_of_all_activations_at_once():
    v = variables()
    xs = batches(1, 4)
    grams, counts = input_grams(apply_net, v, xs)
    expected = all_inputs(v, xs)
    assert set(grams) == set(expected)
    for path, x in expected.items():
        np.testing.assert_allclose(grams[path], x.T @ x, rtol=1e-4, atol=1e-4)
        assert counts[path] == x.shape[0]
    assert counts["params/embed/kernel"] == 4 * 3 * 2  # tokens, not batches
    assert counts["params/shared/kernel"] == 2 * 4 * 3 * 2  # the shared layer's two calls


def test_paths_are_the_kernel_paths_of_the_variables_in_forward_order():
    v = variables()
    kernels = {p for p in traverse_util.flatten_dict(v, sep="/") if p.endswith("kernel")}
    order = layer_order(apply_net, v, batches(0, 1)[0])
    assert order == ["params/embed/kernel", "params/block/fc/kernel", "params/shared/kernel"]
    assert set(order) == kernels
    io = jax.jit(lambda var, x: dense_io(apply_net, var, x, layers=("params/block/fc/kernel",)))(v, batches(0, 1)[0])
    x, y = io["params/block/fc/kernel"]
    assert list(io) == ["params/block/fc/kernel"] and x.shape == (6, 6) and y.shape == (6, 5)


def test_per_task_models_and_one_shared_model():
    experts = [variables(0), variables(1)]
    data = [batches(2, 2), batches(3, 3)]
    per_expert = task_grams(apply_net, experts, data)
    shared = task_grams(apply_net, experts[0], data)
    path = "params/block/fc/kernel"
    assert per_expert.grams[path].shape == (2, 6, 6)
    np.testing.assert_array_equal(per_expert.counts[path], [12, 18])
    np.testing.assert_allclose(per_expert.grams[path][0], shared.grams[path][0], rtol=1e-6)
    x = all_inputs(experts[1], data[1])[path]
    np.testing.assert_allclose(per_expert.grams[path][1], x.T @ x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(per_expert.mean_grams()[path][1], x.T @ x / 18, rtol=1e-4, atol=1e-5)


def test_wrong_feature_size_names_the_layer_and_task():
    with pytest.raises(ValueError, match=r"task 1, batch 0: layer 'params/embed/kernel'.*feature size 3"):
        task_grams(apply_net, variables(), [batches(0, 1), batches(0, 1, n=3)])


def test_a_task_without_batches_is_named():
    with pytest.raises(ValueError, match="task 1: no calibration batches"):
        task_grams(apply_net, variables(), [batches(0, 1), []])


def test_non_finite_activations_name_the_layer_and_task():
    bad = batches(0, 2)
    bad[1][0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"task 0: layer 'params/embed/kernel' received NaN/Inf"):
        task_grams(apply_net, variables(), [bad, batches(1, 1)])


def test_a_wrong_prefix_or_model_count_is_a_value_error():
    with pytest.raises(ValueError, match="check prefix"):
        input_grams(apply_net, variables(), batches(0, 1), prefix="weights")
    with pytest.raises(ValueError, match="2 variable pytrees for 3 tasks"):
        task_grams(apply_net, [variables(), variables()], [batches(0, 1)] * 3)
