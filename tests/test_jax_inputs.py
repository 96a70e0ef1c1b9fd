"""What JAX training code holds, merged as its pure parameters are, returned as the type given:
NNX modules, states and ``nnx.split`` tuples (in memory and saved by an orbax manager), Linen
models with an unannotated ``nn.scan`` stack, NNX stacks built with ``nnx.vmap``, boxed
(partitioned) Linen params, TrainStates; optimizer states are never merged as weights."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import yaml
from flax import nnx
from flax.training import train_state

import swudi_jax as sj
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.pipeline import plan_checkpoints
from swudi_jax.model.flat import flatten

from conftest import rel_err

WIDTH, LAYERS = 32, 3


class NnxBlock(nnx.Module):
    """An encoder block as the Flax NNX docs write one."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=WIDTH, decode=False, rngs=rngs)
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.down(nnx.gelu(self.up(x)))


def nnx_family(n: int = 3) -> list[NnxBlock]:
    """A base and ``n`` experts: the base plus small random task vectors (float32)."""
    base = NnxBlock(nnx.Rngs(0))
    out = [base]
    for i in range(n):
        expert = nnx.clone(base)
        params = nnx.state(expert, nnx.Param)
        key = jax.random.key(10 + i)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        nnx.update(expert, jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                                         for x, k in zip(leaves, keys)]))
        out.append(expert)
    return out


def pure(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def assert_trees_close(got, want, tol=1e-6):
    got_flat, want_flat = flatten(got)[0], flatten(want)[0]
    assert set(got_flat) == set(want_flat)
    for path in want_flat:
        assert rel_err(np.asarray(got_flat[path]), np.asarray(want_flat[path])) <= tol, path


def test_nnx_module_state_and_split_merge_as_their_pure_dicts_and_keep_their_type():
    base, *experts = nnx_family()
    want = sj.merge(pure(base), [pure(e) for e in experts], rank_ratio=0.5)
    # the pure dict's DenseGeneral kernels (in, heads, dim) are merged as linear maps, biases by the mean
    plan = {p.path: p for p in sj.plan(pure(base)).plans}
    assert plan["attn/query/kernel"].kind == "linear" and plan["attn/query/kernel"].maths_shape == (WIDTH, WIDTH)
    assert plan["attn/query/bias"].kind == "mean" and plan["up/kernel"].transpose

    merged = sj.merge(base, experts, rank_ratio=0.5)
    assert type(merged) is NnxBlock and merged is not base
    assert_trees_close(pure(merged), want)
    merged(jnp.ones((2, 5, WIDTH)))  # a working module

    state = sj.merge(nnx.state(base), [nnx.state(e) for e in experts], rank_ratio=0.5)
    assert isinstance(state, nnx.State)
    assert_trees_close(nnx.to_pure_dict(nnx.split_state(state, nnx.Param, ...)[0]), want)
    graph, split_state = sj.merge(nnx.split(base), [nnx.split(e) for e in experts], rank_ratio=0.5)
    assert_trees_close(pure(nnx.merge(graph, split_state)), want)
    # the inputs are untouched
    assert rel_err(np.asarray(base.up.kernel[...]), np.asarray(pure(NnxBlock(nnx.Rngs(0)))["up"]["kernel"])) == 0


def test_a_merged_nnx_model_has_its_own_batch_stats_and_rng_state():
    """The merged module's (and State's) non-Param Variables are new objects holding the base's
    values: training the merged model with BatchNorm and Dropout leaves the base unchanged."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(8, WIDTH, rngs=rngs)
            self.bn = nnx.BatchNorm(WIDTH, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.down = nnx.Linear(WIDTH, 4, rngs=rngs)

        def __call__(self, x):
            return self.down(self.drop(nnx.relu(self.bn(self.up(x)))))

    base = Net(nnx.Rngs(params=0, dropout=1))
    experts = []
    for i in range(3):
        expert = nnx.clone(base)
        expert.up.kernel[...] += 0.01 * jax.random.normal(jax.random.key(i), expert.up.kernel.shape)
        experts.append(expert)
    before = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(base)))[0].items()
              if not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)}
    merged = sj.merge(base, experts)
    state = sj.merge(nnx.state(base), [nnx.state(e) for e in experts])
    assert merged.bn.mean is not base.bn.mean and merged.drop.rngs.count is not base.drop.rngs.count
    assert state["bn"]["mean"] is not nnx.state(base)["bn"]["mean"]
    np.testing.assert_array_equal(np.asarray(merged.bn.var[...]), np.asarray(base.bn.var[...]))  # the base's values
    merged.train()
    merged(5 * jnp.ones((4, 8)))  # moves the merged model's statistics and dropout count
    assert int(merged.drop.rngs.count[...]) == int(base.drop.rngs.count[...]) + 1
    after = flatten(nnx.to_pure_dict(nnx.state(base)))[0]
    for path, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[path]), value, err_msg=path)


def test_models_given_in_two_forms_merge_when_their_params_agree_and_are_refused_naming_the_forms_if_not():
    base, *experts = nnx_family()
    want = sj.merge(pure(base), [pure(e) for e in experts], rank_ratio=0.5)
    mixed = sj.merge(base, [nnx.state(e) for e in experts], rank_ratio=0.5)  # Module base, State experts
    assert_trees_close(pure(mixed), want)
    full = [nnx.to_pure_dict(nnx.state(e)) for e in experts]  # every leaf, the RNG state too
    with pytest.raises(ValueError, match=r"expert 0: parameter paths differ from the base: extra 'drop/rngs/count'.*"
                                         r"expert 0 is given as pytree, the base as nnx.State"):
        sj.merge(nnx.state(base), full)
    with pytest.raises(ValueError, match="given as pytree, the base as nnx.Module"):
        sj.plan(base, experts=full)


def test_nnx_optimizer_and_optax_states_are_refused_naming_the_path():
    base, *experts = nnx_family(2)
    optimizer = nnx.Optimizer(base, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(ValueError, match="optimizer state.*optimizer.model"):
        sj.merge(optimizer, experts)
    params = pure(base)
    tree = {"params": params, "opt_state": optax.adam(1e-3).init(params)}
    with pytest.raises(ValueError, match=r"\['opt_state'\].*optimizer state.*never merged"):
        sj.merge(tree, [tree, tree])


def test_a_train_state_merges_its_params_and_keeps_the_base_optimizer_state():
    base, *experts = nnx_family(2)
    tx = optax.adam(1e-3)
    states = [train_state.TrainState.create(apply_fn=None, params=pure(m), tx=tx) for m in (base, *experts)]
    states[0] = states[0].replace(step=7)
    with pytest.warns(UserWarning, match="opt_state"):
        merged = sj.merge(states[0], states[1:], rank_ratio=0.5)
    assert isinstance(merged, train_state.TrainState) and merged.step == 7
    assert merged.opt_state is states[0].opt_state
    assert_trees_close(merged.params, sj.merge(pure(base), [pure(e) for e in experts], rank_ratio=0.5))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.MultiHeadDotProductAttention(num_heads=4)(nn.LayerNorm()(x))
        x = x + h
        x = x + nn.Dense(WIDTH)(nn.gelu(nn.Dense(2 * WIDTH)(nn.LayerNorm()(x))))
        return x, None


class LinenModel(nn.Module):
    """A Linen model whose blocks are one ``nn.scan`` stack, as the Flax docs scan over layers."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(50, WIDTH)(tokens)
        stack = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(7)(nn.LayerNorm()(x))


def linen_family(n: int = 3):
    tokens = jnp.ones((1, 4), jnp.int32)
    base = LinenModel().init(jax.random.key(0), tokens)
    experts = []
    for i in range(n):
        keys = iter(jax.random.split(jax.random.key(20 + i), 64))
        experts.append(jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), base))
    return base, experts


def test_an_unannotated_linen_scan_stack_is_detected_warned_and_merged_as_annotated():
    base, experts = linen_family()
    scan = ["params/blocks/*"]
    plan = sj.plan(base)
    assert any("'params/blocks'" in g and f"{LAYERS} layers" in g for g in plan.guesses), plan.guesses
    stacked = {p.path: p for p in plan.plans}
    assert stacked["params/blocks/Dense_0/kernel"].layers == LAYERS
    assert stacked["params/blocks/MultiHeadDotProductAttention_0/query/kernel"].maths_shape == (WIDTH, WIDTH)
    assert stacked["params/blocks/LayerNorm_0/scale"].kind == "mean"
    with pytest.warns(UserWarning, match="'params/blocks'.*scanned stack of 3 layers"):
        got = sj.merge(base, experts, rank_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # annotated: nothing is a guess
        want = sj.merge(base, experts, rank_ratio=0.5, scan_patterns=scan)
    assert_trees_close(got, want)
    # merged layer by layer: layer 1 alone equals a merge of layer 1's matrices
    layer = lambda tree: tree["params"]["blocks"]["Dense_0"]["kernel"][1]  # noqa: E731
    alone = sj.merge({"kernel": layer(base)}, [{"kernel": layer(e)} for e in experts], rank_ratio=0.5)["kernel"]
    assert rel_err(np.asarray(layer(got)), np.asarray(alone)) <= 1e-5
    # "no stacks" is a statement the user can make; then the stack is not merged as linear maps
    plain = {p.path: p for p in sj.plan(base, scan_patterns=[]).plans}
    assert plain["params/blocks/Dense_0/kernel"].kind == "mean"


def test_an_nnx_stack_built_with_vmap_is_detected():
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return NnxBlock(nnx.Rngs(key))

    base = create(jax.random.split(jax.random.key(0), LAYERS))
    params = pure(base)
    experts = [jax.tree.map(lambda x, i=i: x + 0.05 * jax.random.normal(jax.random.key(i), x.shape), params)
               for i in range(3)]
    plan = {p.path: p for p in sj.plan(params).plans}
    assert plan["up/kernel"].layers == LAYERS and plan["attn/out/kernel"].maths_shape == (WIDTH, WIDTH)
    with pytest.warns(UserWarning, match="scanned stack of 3 layers"):
        got = sj.merge(params, experts, rank_ratio=0.5)
    assert_trees_close(got, sj.merge(params, experts, rank_ratio=0.5, scan_patterns="*"))


def test_partitioned_linen_params_are_unboxed_and_boxed_again():
    class Sharded(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(16, kernel_init=init)(x)

    base = Sharded().init(jax.random.key(0), jnp.ones((1, 8)))
    experts = [jax.tree.map(lambda x, i=i: x + 0.1 * i, base) for i in (1, 2)]
    merged = sj.merge(base, experts)
    box = merged["params"]["Dense_0"]["kernel"]
    assert isinstance(box, nn.Partitioned) and box.names == ("embed", "mlp")
    assert_trees_close(nn.unbox(merged), sj.merge(nn.unbox(base), [nn.unbox(e) for e in experts]))


def test_an_nnx_state_saved_by_an_orbax_manager_merges_like_its_pure_dict_and_keeps_its_typed_keys(tmp_path):
    base, *experts = nnx_family()
    for name, model in zip(("base", "e0", "e1", "e2"), (base, *experts)):
        with ocp.CheckpointManager(tmp_path / name) as manager:
            manager.save(100, args=ocp.args.StandardSave(nnx.state(model)))
            manager.wait_until_finished()
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({
        "base_model": "base", "models": ["e0", "e1", "e2"], "merge_method": "swudi",
        "parameters": {"rank_ratio": 0.5}}))
    plan = {p.path: p for p in plan_checkpoints(tmp_path / "merge.yaml").plans}
    assert plan["up/kernel/value"].kind == "linear" and plan["up/kernel/value"].transpose
    assert plan["attn/query/bias/value"].kind == "mean"
    out = sj.merge_checkpoints(tmp_path / "merge.yaml", tmp_path / "out", progress=False)
    got = ckio.load(ckio.weights_path(out, "orbax"))
    want = flatten(sj.merge(pure(base), [pure(e) for e in experts], rank_ratio=0.5))[0]
    for path, value in want.items():
        assert rel_err(got[f"{path}/value"], np.asarray(value)) <= 1e-6, path
    # the RNG state is copied, not merged, and the key is saved as a typed key again
    rngs = nnx.state(base)["drop"]["rngs"]
    np.testing.assert_array_equal(got["drop/rngs/count/value"], np.asarray(rngs["count"][...]))
    assert set(ckio.open_checkpoint(tmp_path / "base").key_impls()) == {"drop/rngs/key/value"}
    with ocp.StandardCheckpointer() as checkpointer:
        key = checkpointer.restore(ckio.weights_path(out, "orbax"))["drop"]["rngs"]["key"]["value"]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
    assert jax.random.key_impl(key) == jax.random.key_impl(rngs["key"][...])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(rngs["key"][...]))


def test_an_orbax_saved_train_state_leaves_its_optimizer_state_out():
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
    flat = flatten({"params": state.params, "opt_state": state.opt_state, "step": np.int32(0)})[0]
    plan = sj.plan(flat)
    kinds = {p.path: p.kind for p in plan.plans}
    assert kinds["params/Dense_0/kernel"] == "linear"
    assert {kinds[p] for p in kinds if p.startswith("opt_state") and "count" not in p} == {"keep"}
    assert any("optimizer state, not merged" in g for g in plan.guesses)


def test_a_plain_pytree_merge_does_not_import_flax_nnx():
    """NNX objects exist only once flax.nnx is imported, so a plain pytree's merge does not import
    it (0.13 s of a cold first call)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, swudi_jax as sj\n"
            "base = {'w': np.ones((4, 3), np.float32)}\n"
            "experts = [{'w': base['w'] + i * np.eye(4, 3, dtype=np.float32)} for i in (1, 2)]\n"
            "sj.merge(base, experts, 'swudi')\n"
            "print('flax.nnx' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout


def test_an_nnx_pure_dict_with_rng_keys_merges_and_keeps_the_base_keys():
    """``nnx.to_pure_dict`` of a model with Dropout holds its ``rngs``: a typed PRNG key leaf
    (``key<fry>``) and a count. Both pass through from the base; the weights merge as without them."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(12, 8, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def pure(seed, shift):
        state = nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(seed))))
        state["dense"]["kernel"] = state["dense"]["kernel"] + shift
        return state

    base = pure(0, 0.0)
    rng = np.random.default_rng(1)
    experts = [pure(seed, rng.normal(scale=0.05, size=(12, 8)).astype(np.float32)) for seed in (1, 2, 3)]
    key = base["dropout"]["rngs"]["key"]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    merged = sj.merge(base, experts, "swudi")
    out_key = merged["dropout"]["rngs"]["key"]
    assert jax.dtypes.issubdtype(out_key.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(out_key) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(out_key), jax.random.key_data(key))
    assert int(merged["dropout"]["rngs"]["count"]) == int(base["dropout"]["rngs"]["count"])
    weights = sj.merge({"dense": base["dense"]}, [{"dense": e["dense"]} for e in experts], "swudi")
    np.testing.assert_array_equal(np.asarray(merged["dense"]["kernel"]), np.asarray(weights["dense"]["kernel"]))
    rows = {p.path: p.kind for p in sj.plan(base).plans}
    assert rows["dropout/rngs/key"] == rows["dropout/rngs/count"] == "passthrough"
    assert rows["dense/kernel"] == "linear"
