"""``sj.merge`` on LoRA experts in memory: ``sj.Adapter`` values and Flax NNX models with
``nnx.LoRALinear`` / ``nnx.LoRA`` layers, merged from the factors by the spectral methods.

A tiny Llama (torch layout, hidden 32, MLP 48) with three adapters: rank 4 on every projection,
rank 8 on every projection with a per-path scale, rank 4 on q/v only (so the other projections
are adapted by two experts of three and densified); and a two-layer NNX MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx
from test_lora_checkpoints import MODULES, QV, tiny_llama

import swudi_jax as sj
from swudi_jax.model import adapters
from swudi_jax.model.flat import flatten

OPTIONS = {"swudi": {"time": 300.0, "rank_ratio": 0.85}, "swudi_a": {}, "iwudi": {"time": 50.0}, "pinv": {}}
WEIGHTS = [0.5, 1.0, 2.0]


def llama_adapters(base, seed=1):
    """Three sj.Adapter experts in torch layout: left = B (out, r), right = A (r, in)."""
    rng = np.random.default_rng(seed)

    def factors(modules, rank):
        out = {}
        for m in modules:
            rows, cols = base[m + ".weight"].shape
            out[m + ".weight"] = (0.05 * rng.normal(size=(rows, rank)), rng.normal(size=(rank, cols)) / np.sqrt(cols))
        return out

    return [sj.Adapter(factors(MODULES, 4), 2.0),
            sj.Adapter(factors(MODULES, 8), {m + ".weight": 0.5 + i / 10 for i, m in enumerate(MODULES)}),
            sj.Adapter(factors(QV, 4))]


def densified(base, adapter):
    """base + s · left @ right on every leaf the adapter names, in float64 then the base's dtype."""
    out = dict(base)
    for path, (left, right) in adapter.factors.items():
        s = adapter.scale.get(path, 1.0) if isinstance(adapter.scale, dict) else adapter.scale
        out[path] = (np.asarray(base[path], np.float64) + s * np.asarray(left, np.float64) @ right).astype(base[path].dtype)
    return out


def task_vector_error(got, want, base) -> float:
    """The largest ‖got − want‖ / ‖want − base‖ over the leaves some adapter changes."""
    return max(rel_err(np.asarray(got[k], np.float64) - base[k], np.asarray(want[k], np.float64) - base[k])
               for k in base if not np.array_equal(np.asarray(want[k]), base[k]))


def called_paths(monkeypatch) -> list[str]:
    seen: list[str] = []
    original = adapters.merge_from_factors

    def spy(plan, *args, **kwargs):
        seen.append(plan.path)
        return original(plan, *args, **kwargs)

    monkeypatch.setattr(adapters, "merge_from_factors", spy)
    return seen


@pytest.mark.parametrize("method", ["swudi", "pinv", pytest.param("swudi_a", marks=pytest.mark.slow),
                                    pytest.param("iwudi", marks=pytest.mark.slow)])
def test_factor_path_equals_the_densified_merge_in_float64(method, monkeypatch):
    """float64 base: sj.merge on Adapters == sj.merge on the densified experts θ0 + s·left@right
    (≤ 1e-5 of each task vector); q/v (every expert adapts them) ran from the factors."""
    with jax.enable_x64(True):
        base = {k: v.astype(np.float64) for k, v in tiny_llama(np.random.default_rng(0)).items()}
        experts = llama_adapters(base)
        seen = called_paths(monkeypatch)
        got = sj.merge(base, experts, method, layout="torch", weight=WEIGHTS, **OPTIONS[method])
        assert sorted(seen) == sorted(m + ".weight" for m in QV)
        monkeypatch.undo()
        want = sj.merge(base, [densified(base, a) for a in experts], method, layout="torch", weight=WEIGHTS,
                        **OPTIONS[method])
    assert all(got[k].dtype == np.float64 for k in base)
    assert task_vector_error(got, want, base) <= 1e-5


def test_float32_factor_path_is_close_to_the_exact_merge():
    """float32: the factor path is within 1e-5 of the float64 merge of each task vector (its
    R × R problem, R = 16 here, loses ~κ·eps32 ≈ 1e-6; the result adds θ0 and rounds to float32, an
    error of ~eps32·‖θ0‖ ≈ 1e-7·‖θ0‖ against ‖τ‖ ≈ 0.05·‖θ0‖)."""
    base = tiny_llama(np.random.default_rng(0))
    experts = llama_adapters(base)
    got = sj.merge(base, experts, "swudi", layout="torch")
    assert all(got[k].dtype == np.float32 for k in base)
    for path in (m + ".weight" for m in QV):
        with jax.enable_x64(True):
            scales = [a.scale.get(path, 1.0) if isinstance(a.scale, dict) else a.scale for a in experts]
            exact = np.asarray(sj.merge_lora([(s * np.asarray(a.factors[path][0], np.float64), a.factors[path][1])
                                              for a, s in zip(experts, scales)], "swudi"))
        assert rel_err(np.asarray(got[path], np.float64) - base[path], exact) <= 1e-5, path


def test_plan_shows_the_leaves_merged_from_factors():
    base = tiny_llama(np.random.default_rng(0))
    experts = llama_adapters(base)
    tree_plan = sj.plan(base, "swudi", experts=experts, layout="torch")
    assert sorted(tree_plan.factors) == sorted(m + ".weight" for m in QV)
    rows = {line.split()[0]: line for line in str(tree_plan).splitlines() if line}
    assert "swudi (factors)" in rows[QV[0] + ".weight"] and "(factors)" not in rows[MODULES[-1] + ".weight"]
    assert sj.plan(base, "ties", experts=experts, layout="torch").factors == ()


def test_mixed_lists_and_other_methods_densify(monkeypatch):
    """One dense expert among adapters, or a method without a spectral filter: every leaf densified
    (float64: the dense path's result is then insensitive to how θ0 + s·left@right was rounded)."""
    with jax.enable_x64(True):
        base = {k: v.astype(np.float64) for k, v in tiny_llama(np.random.default_rng(0)).items()}
        experts = llama_adapters(base)
        seen = called_paths(monkeypatch)
        dense = densified(base, experts[0])
        mixed = sj.merge(base, [dense, *experts[1:]], "swudi", layout="torch")
        linear = sj.merge(base, experts, "task_arithmetic", layout="torch")
        assert seen == []
        want = sj.merge(base, [dense, *(densified(base, a) for a in experts[1:])], "swudi", layout="torch")
        assert task_vector_error(mixed, want, base) <= 1e-10
        want = sj.merge(base, [densified(base, a) for a in experts], "task_arithmetic", layout="torch")
        assert task_vector_error(linear, want, base) <= 1e-10


class MLP(nnx.Module):
    """A two-layer MLP as the Flax docs build one; ``lora_rank`` swaps nnx.Linear for nnx.LoRALinear."""

    def __init__(self, rngs: nnx.Rngs, lora_rank: int | None = None, dtype=jnp.float32):
        def linear(i, o):
            if lora_rank is None:
                return nnx.Linear(i, o, param_dtype=dtype, rngs=rngs)
            return nnx.LoRALinear(i, o, lora_rank=lora_rank, param_dtype=dtype, lora_param_dtype=dtype, rngs=rngs)

        self.up = linear(24, 40)
        self.down = linear(40, 16)
        self.norm = nnx.LayerNorm(16, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.down(nnx.relu(self.up(x))))


def nnx_experts(base: MLP):
    """LoRALinear experts of rank 4 and 8 over ``base``'s weights (lora_b nonzero), the second with a
    fine-tuned LayerNorm; and a third whose ``up`` is a LoRALinear and ``down`` an nnx.LoRA wrapping
    base's Linear (``model.down = nnx.LoRA(..., base_module=model.down)``)."""
    dtype = base.up.kernel.dtype
    out = []
    for seed, rank in ((1, 4), (2, 8)):
        expert = MLP(nnx.Rngs(seed), lora_rank=rank, dtype=dtype)
        nnx.update(expert, nnx.state(base, nnx.Param))  # the base's kernels, biases and norm
        for layer in (expert.up, expert.down):
            layer.lora.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(seed), layer.lora.lora_b.shape, dtype)
        out.append(expert)
    out[1].norm.scale[...] = out[1].norm.scale[...] + 0.1
    third = nnx.clone(base)
    third.up = nnx.LoRALinear(24, 40, lora_rank=4, param_dtype=dtype, lora_param_dtype=dtype, rngs=nnx.Rngs(3))
    nnx.update(third.up, nnx.state(base.up, nnx.Param))
    third.up.lora.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(3), (4, 40), dtype)
    third.down = nnx.LoRA(40, 4, 16, base_module=third.down, param_dtype=dtype, rngs=nnx.Rngs(4),
                          b_initializer=nnx.initializers.normal(0.1))
    out.append(third)
    return out


def nnx_densified(base: MLP, expert) -> MLP:
    """The plain model with each LoRA layer's kernel + lora_a @ lora_b."""
    plain = nnx.clone(base)
    nnx.update(plain.norm, nnx.state(expert.norm, nnx.Param))
    for name in ("up", "down"):
        layer = getattr(expert, name)
        lora, linear = (layer.lora, layer) if isinstance(layer, nnx.LoRALinear) else (layer, layer.base_module)
        getattr(plain, name).kernel[...] = linear.kernel[...] + lora.lora_a[...] @ lora.lora_b[...]
        getattr(plain, name).bias[...] = linear.bias[...]
    return plain


@pytest.mark.slow
def test_nnx_lora_experts_merge_from_factors_as_the_densified_models(monkeypatch):
    """float64 NNX models: the LoRA experts merged by swudi (kernels from the factors, the
    LayerNorm by the mean) == the merge of the plain models with kernel + lora_a @ lora_b."""
    with jax.enable_x64(True):
        base = MLP(nnx.Rngs(0), dtype=jnp.float64)
        experts = nnx_experts(base)
        seen = called_paths(monkeypatch)
        got = sj.merge(base, experts, "swudi")
        assert sorted(seen) == ["down/kernel", "up/kernel"]
        monkeypatch.undo()
        want = sj.merge(base, [nnx_densified(base, e) for e in experts], "swudi")
        assert type(got) is MLP
        pairs = zip(*(nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (got, want, base)))
        for (path, g), (_, w), (_, b) in pairs:
            assert g[...].dtype == jnp.float64
            assert rel_err(g[...] - b[...], w[...] - b[...]) <= 1e-8, path


def test_nnx_lora_over_a_changed_kernel_is_densified_with_a_warning(monkeypatch):
    base = MLP(nnx.Rngs(0))
    experts = nnx_experts(base)
    experts[0].up.kernel[...] = experts[0].up.kernel[...] + 0.01
    seen = called_paths(monkeypatch)
    with pytest.warns(UserWarning, match=r"expert 0: the kernel under the nnx.LoRA at 'up/kernel' differs"):
        got = sj.merge(base, experts, "swudi")
    assert seen == ["down/kernel"]
    want = sj.merge(base, [nnx_densified(base, e) for e in experts], "swudi")
    assert rel_err(got.up.kernel[...] - base.up.kernel[...], want.up.kernel[...] - base.up.kernel[...]) <= 1e-5


def test_flax_layout_adapters_on_an_nnx_base():
    """Adapter factors of a Flax kernel (in, out) are lora_a (in, r) @ lora_b (r, out)."""
    base = MLP(nnx.Rngs(0))
    rng = np.random.default_rng(5)
    experts = [sj.Adapter({"up/kernel": (rng.normal(size=(24, r)), 0.1 * rng.normal(size=(r, 40))),
                           "down/kernel": (rng.normal(size=(40, r)), 0.1 * rng.normal(size=(r, 16)))}, 0.5)
               for r in (4, 8, 2)]
    got = sj.merge(base, experts, "swudi_a")
    params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    flat = {f"{k}/{leaf}": np.asarray(v) for k, d in params.items() for leaf, v in d.items()}
    dense = [densified(flat, a) for a in experts]
    plain = [nnx.clone(base) for _ in dense]
    for model, d in zip(plain, dense):
        model.up.kernel[...], model.down.kernel[...] = d["up/kernel"], d["down/kernel"]
    want = sj.merge(base, plain, "swudi_a")
    assert type(got) is MLP
    for name in ("up", "down"):
        np.testing.assert_allclose(getattr(got, name).kernel[...], getattr(want, name).kernel[...], rtol=1e-4,
                                   atol=1e-5)


def test_adapters_are_refused_naming_the_expert_path_and_shapes():
    base = tiny_llama(np.random.default_rng(0))
    good = llama_adapters(base)[0]
    q = QV[0] + ".weight"
    left, right = good.factors[q]
    cases = {
        "not a parameter of the base": {**good.factors, "model.layers.0.self_attn.q.weight": (left, right)},
        r"the factors do not give the leaf's shape \(left \(32, 4\) @ right \(4, 31\)": {q: (left, right[:, :31])},
        r"'model.norm.weight' is not a 2-D floating weight": {"model.norm.weight": (np.ones((32, 1)), np.ones((1, 1)))},
        "NaN/Inf": {q: (left * np.nan, right)},
    }
    for match, factors in cases.items():
        with pytest.raises(ValueError, match="expert 1: .*" + match):
            sj.merge(base, [good, sj.Adapter(factors)], "swudi", layout="torch")
    with pytest.raises(ValueError, match="expert 0: the adapter's scale names path"):
        sj.merge(base, [sj.Adapter(good.factors, {"nope": 1.0}), good], "swudi", layout="torch")
    stacked = {"blocks/kernel": np.zeros((3, 8, 8), np.float32), "head/kernel": np.zeros((8, 4), np.float32)}
    scanned = sj.Adapter({"blocks/kernel": (np.ones((8, 2)), np.ones((2, 8)))})
    with pytest.raises(ValueError, match=r"expert 0: 'blocks/kernel' is not a 2-D .*base leaf \(3, 8, 8\)"):
        sj.merge(stacked, [scanned, scanned], "swudi", scan_patterns="blocks/*")


def test_nnx_states_and_splits_read_as_the_module():
    """nnx.state(model) and nnx.split(model) of a LoRA expert give the module's adapters; a plain
    model's state is a dense expert."""
    base = MLP(nnx.Rngs(0))
    expert = nnx_experts(base)[2]
    base_flat = flatten(nnx.to_pure_dict(nnx.state(base, nnx.Param)))[0]
    plans = sj.plan(base).plans
    read = adapters.read_experts([expert, nnx.state(expert), nnx.split(expert), nnx.state(base)], base_flat, plans)
    for delta in read[:3]:
        assert sorted(delta.factors) == ["down/kernel", "up/kernel"] and "down/kernel" not in delta.dense
        np.testing.assert_array_equal(delta.factors["down/kernel"][1], expert.down.lora_b[...])
    assert read[3].factors == {} and sorted(read[3].dense) == sorted(base_flat)
