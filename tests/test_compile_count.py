"""A whole-model merge compiles once per shape group: biases and norms do not each compile, and
the chunks of one group share one executable (compilations counted, never timed)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import yaml
from conftest import experts_of

import swudi_jax as sj
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.pipeline import merge_checkpoints
from swudi_jax.model.batching import compile_groups, padded_sizes, stack_group, unstack_group
from swudi_jax.model.compilations import CompileCounter
from swudi_jax.methods.registry import resolve
from swudi_jax.model.merger import plan_tree


def bert_like(rng, layers=3, hidden=12, inner=20) -> dict[str, np.ndarray]:
    """HF-layout encoder: q/k/v/o (h×h), up (i×h), down (h×i), biases of two sizes, two norms."""
    flat = {"embeddings.word_embeddings.weight": rng.normal(size=(30, hidden)),
            "embeddings.LayerNorm.weight": 1 + 0.1 * rng.normal(size=(hidden,)),
            "embeddings.LayerNorm.bias": 0.1 * rng.normal(size=(hidden,))}
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value", "output"):
            flat[f"{p}.attention.{name}.weight"] = rng.normal(size=(hidden, hidden))
            flat[f"{p}.attention.{name}.bias"] = 0.1 * rng.normal(size=(hidden,))
        flat[f"{p}.intermediate.dense.weight"] = rng.normal(size=(inner, hidden))
        flat[f"{p}.intermediate.dense.bias"] = 0.1 * rng.normal(size=(inner,))
        flat[f"{p}.output.dense.weight"] = rng.normal(size=(hidden, inner))
        flat[f"{p}.output.dense.bias"] = 0.1 * rng.normal(size=(hidden,))
        for norm in ("attention.LayerNorm", "output.LayerNorm"):
            flat[f"{p}.{norm}.weight"] = 1 + 0.1 * rng.normal(size=(hidden,))
            flat[f"{p}.{norm}.bias"] = 0.1 * rng.normal(size=(hidden,))
    return {k: v.astype(np.float32) for k, v in flat.items()}


# linear maths shapes (30, 12) embedding, (12, 12) attention, (20, 12) up, (12, 20) down; one flat mean call
SHAPE_GROUPS = 5


@pytest.fixture
def model():
    rng = np.random.default_rng(0)
    base = bert_like(rng)
    return base, experts_of(base, rng)


def test_merge_compiles_once_per_shape_group(model):
    base, experts = model
    jax.clear_caches()
    with CompileCounter() as first:
        merged = sj.merge(base, experts, "swudi", layout="torch")
    assert first.count == SHAPE_GROUPS, first.by_name()
    with CompileCounter() as again:
        sj.merge(base, experts, "swudi", layout="torch")
    assert again.count == 0, again.by_name()
    # chunked groups (2 attention layers per chunk out of 12; biases in 2 chunks) reuse one executable
    jax.clear_caches()
    per_layer = 4 * 12 * 12 * 4  # base + 3 experts, float32
    with CompileCounter() as chunked:
        small = sj.merge(base, experts, "swudi", layout="torch", max_group_bytes=2 * per_layer)
    assert chunked.count == SHAPE_GROUPS, chunked.by_name()
    for key in base:
        np.testing.assert_allclose(np.asarray(small[key]), np.asarray(merged[key]), rtol=2e-5, atol=2e-6, err_msg=key)


def test_swudi_merge_compiles_once_per_shape_group(model, tmp_path):
    base, experts = model
    for name, m in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts))]:
        ckio.save(tmp_path / name, m, shard_size=4000)
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump({"base_model": "base", "models": ["e0", "e1", "e2"], "merge_method": "swudi"}))
    jax.clear_caches()
    with CompileCounter() as compiles:
        merge_checkpoints(config, tmp_path / "out", progress=False, max_group_bytes=3000)
    assert compiles.count == SHAPE_GROUPS, compiles.by_name()
    got = ckio.load(tmp_path / "out")
    want = sj.merge(base, experts, "swudi", layout="torch")
    for key in base:
        np.testing.assert_allclose(got[key], np.asarray(want[key]), rtol=2e-5, atol=2e-6, err_msg=key)


def test_mean_leaves_form_one_flat_group_per_dtype_unless_the_method_is_elementwise(model):
    base, _ = model
    plans = plan_tree({k: (v.shape, v.dtype) for k, v in base.items()}, layout="torch")
    means = [p for p in plans if p.kind == "mean"]
    groups = compile_groups(plans, None, elementwise=False)
    flat = [g for g in groups if g[0].kind == "mean"]
    assert len(flat) == 1 and sorted(p.path for p in flat[0]) == sorted(p.path for p in means)
    per_shape = [g for g in compile_groups(plans, None, elementwise=True) if g[0].kind == "mean"]
    assert sorted(len(g) for g in per_shape) == sorted([3, 2 + 3 * 9])  # (20,) biases; (12,) biases and norms
    for g in groups:
        assert len({(p.kind, p.maths_shape) for p in g}) == 1 or g[0].kind == "mean"


def test_chunks_of_one_group_are_even_and_padded_to_one_size():
    plans = plan_tree({f"l{i}.weight": ((6, 4), np.float32) for i in range(7)}, layout="torch")
    groups = compile_groups(plans, 5 * 6 * 4 * 4, copies=1)  # greedy chunks of 5 and 2 leaves, evened out
    assert [len(g) for g in groups] == [4, 3]
    assert padded_sizes(groups, False) == [4, 4]
    rng = np.random.default_rng(1)
    base = {p.path: rng.normal(size=p.shape).astype(np.float32) for p in plans}
    experts = [{k: v + 1 for k, v in base.items()}, {k: v + 2 for k, v in base.items()}]
    short = min(groups, key=len)
    b, e = stack_group(short, base, experts, False, 4)
    assert b.shape == (4, 6, 4) and e.shape == (4, 2, 6, 4)
    np.testing.assert_array_equal(b[-1], b[len(short) - 1])  # padding repeats the last real layer
    back = unstack_group(short, b, False)
    assert sorted(back) == sorted(p.path for p in short)
    for p in short:
        np.testing.assert_array_equal(back[p.path], base[p.path])


def test_flat_means_take_per_tensor_per_expert_weights_and_padded_chunks_valid_options():
    """mergekit's per-expert ``weight`` varying per tensor on
    flat-batched mean leaves: θ0 + s · mean_i(w_i τ_i) leaf by leaf; chunks padded to one size get
    their per-layer option values padded like the layers (same result as one unchunked call)."""
    rng = np.random.default_rng(3)
    base = {"dense/kernel": rng.normal(size=(6, 5)), "dense/bias": rng.normal(size=(5,)),
            "norm/scale": rng.normal(size=(7,)), "norm2/bias": rng.normal(size=(4,)),
            **{f"l{i}/kernel": rng.normal(size=(6, 5)) for i in range(5)}}
    base = {k: v.astype(np.float32) for k, v in base.items()}
    experts = [{k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
               for _ in range(2)]

    def per_tensor(path, layer):
        w0 = 1.0 + len(path) / 10 + (0.0 if layer is None else 0.25 * layer)
        return {"weight": [w0, 0.5]}

    kw = {"layout": "flax", "tensor_options": per_tensor, "scale": 0.8}
    got = sj.merge(base, experts, "swudi", **kw)
    for path in ("dense/bias", "norm/scale", "norm2/bias"):  # one flat call, three weight pairs
        w = np.array(per_tensor(path, None)["weight"])[:, None]
        tau = np.stack([e[path] - base[path] for e in experts])
        want = base[path] + 0.8 * np.mean(w * tau, axis=0)
        np.testing.assert_allclose(np.asarray(got[path]), want, rtol=1e-5, atol=1e-6, err_msg=path)
    per_layer = 3 * 6 * 5 * 4  # base + 2 experts, float32
    with CompileCounter() as chunked:
        small = sj.merge(base, experts, "swudi", max_group_bytes=4 * per_layer, **kw)  # 6 kernels in chunks of 3
    assert set(chunked.by_name()) <= {"jit(run)"}, chunked.by_name()
    for key in base:
        np.testing.assert_allclose(np.asarray(small[key]), np.asarray(got[key]), rtol=2e-5, atol=2e-6, err_msg=key)


@pytest.mark.parametrize("flat", [False, True])
def test_host_and_device_stacking_give_the_same_stacks(flat):
    """stack_group on NumPy arrays (host buffers) and on JAX arrays (device ops) against a NumPy
    transcription: linear leaves (a transposed Flax kernel, a scanned one) per layer in maths
    layout, the last layer repeated; flat means raveled, concatenated, zero-padded."""
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    if flat:
        shapes = {"a/bias": (5,), "a/scale": (2, 3)}
        plans = plan_tree({k: (s, np.float32) for k, s in shapes.items()}, layout="flax")
        size = 14
    else:
        shapes = {"a/kernel": (3, 4), "scan/kernel": (2, 3, 4)}
        plans = plan_tree({k: (s, np.float32) for k, s in shapes.items()}, layout="flax", scan_patterns="scan*")
        size = 5
    models = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]

    def reference(m):
        if flat:
            row = np.concatenate([m[k].ravel() for k in shapes])
            return np.pad(row, (0, size - row.size))[None]
        layers = [m["a/kernel"].T] + [m["scan/kernel"][i].T for i in range(2)]
        return np.stack(layers + [layers[-1]] * (size - len(layers)))

    want_b = reference(models[0])
    want_e = np.stack([reference(m) for m in models[1:]], axis=1)
    for arrays in (models, [{k: jnp.asarray(v) for k, v in m.items()} for m in models]):
        b, e = stack_group(plans, arrays[0], arrays[1:], flat, size)
        np.testing.assert_array_equal(np.asarray(b), want_b)
        np.testing.assert_array_equal(np.asarray(e), want_e)


# ---------------------------------------------------------------- compiler options and dispatch


@pytest.mark.parametrize(("method", "options"), [("swudi", {}), ("ties", {"density": 0.5}), ("della", {"seed": 3}),
                                                 ("task_arithmetic", {})])
def test_fast_cpu_compile_gives_bit_identical_merges(model, monkeypatch, method, options):
    """The 32-bit programs compile with FAST_CPU_COMPILE (the classic emitters); XLA's default
    emitters give the same result (bit-identical here, measured in benchmarks/README.md)."""
    from swudi_jax.model import compilations, merger

    base, experts = model
    asked = []

    def spy(dtype):
        asked.append((np.dtype(dtype).name, compilations.compiler_options(dtype)))
        return asked[-1][1]

    merger._COMPILED.clear()
    monkeypatch.setattr(merger, "compiler_options", spy)
    fast = sj.merge(base, experts, method, layout="torch", **options)
    assert asked and all(opts == compilations.FAST_CPU_COMPILE for _, opts in asked), asked
    assert {name for name, _ in asked} == {"float32"}
    merger._COMPILED.clear()
    monkeypatch.setattr(merger, "compiler_options", lambda dtype: None)
    default = sj.merge(base, experts, method, layout="torch", **options)
    merger._COMPILED.clear()
    for path in base:  # bit-identical on the machine measured; a tolerance for other CPUs' vector code
        np.testing.assert_allclose(np.asarray(fast[path]), np.asarray(default[path]), rtol=1e-6, atol=1e-7,
                                   err_msg=path)


def test_compiler_options_keep_xla_defaults_for_16_bit_programs():
    import ml_dtypes

    from swudi_jax.model.compilations import FAST_CPU_COMPILE, compiler_options

    assert jax.default_backend() == "cpu"
    assert compiler_options(np.float32) == compiler_options(np.float64) == FAST_CPU_COMPILE
    assert compiler_options(ml_dtypes.bfloat16) is None and compiler_options(np.float16) is None


@pytest.mark.parametrize("max_group_bytes", [None, 1])
def test_a_merge_keeps_two_groups_in_flight_and_collects_them_in_order(model, monkeypatch, max_group_bytes):
    """Groups start largest first; each is dispatched before the one before it is collected (JAX
    runs it meanwhile), never more than two at once, and one at a time when two groups' stacks pass max_group_bytes;
    the result equals merge_group on each group."""
    from swudi_jax.model import merger

    base, experts = model
    events, started_bytes, real = [], [], merger._start_group

    def start(plans, *args):
        events.append(("start", plans[0].path))
        started_bytes.append(sum(p.nbytes for p in plans))
        collect = real(plans, *args)

        def collected():
            events.append(("collect", plans[0].path))
            return collect()
        return collected

    monkeypatch.setattr(merger, "_start_group", start)
    merged = sj.merge(base, experts, "swudi", layout="torch", max_group_bytes=max_group_bytes)
    starts = [path for kind, path in events if kind == "start"]
    plans = plan_tree({k: (v.shape, v.dtype) for k, v in base.items()}, layout="torch")
    groups = compile_groups(plans, max_group_bytes, copies=len(experts) + 1)
    assert len(starts) == len(groups) == (SHAPE_GROUPS if max_group_bytes is None else len(base))
    assert started_bytes == sorted(started_bytes, reverse=True)  # largest first
    assert [path for kind, path in events if kind == "collect"] == starts
    in_flight = np.cumsum([1 if kind == "start" else -1 for kind, _ in events])
    assert in_flight.max() == (2 if max_group_bytes is None else 1) and in_flight[-1] == 0
    if max_group_bytes is None:
        assert events[:3] == [("start", starts[0]), ("start", starts[1]), ("collect", starts[0])]
    resolved = resolve("swudi", {}, None)
    one_by_one = {}
    for group, size in zip(groups, padded_sizes(groups, False)):
        one_by_one.update(merger.merge_group(group, base, experts, resolved, pad_to=size))
    assert one_by_one.keys() == merged.keys()
    for path in base:
        np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(one_by_one[path]), err_msg=path)
