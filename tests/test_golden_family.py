"""The authors' whole family (issue 11): IWUDI, OptMerge and every SWUDI / SWUDI-A option.

1. Every output of ``data/golden_family.npz`` (the SWUDI authors' PyTorch code, float32; see
   data/GOLDEN_README.md) through ``swudi_jax.merge(base, experts, method, layout="torch",
   **options)`` in float32, within the tolerance of its index entry.
2. The float64 identities between family members (x64 switched on inside each test only).
3. The output-side filter on a tall layer without the m×m matrix E, solver paths, vmap, and
   bad options refused before compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_task_vectors, rel_err, tau64

import swudi_jax as sj
from swudi_jax.maths import filters, rank_rules_family
from swudi_jax.maths.spectral import task_weights
from swudi_jax.methods import iwudi as iwudi_mod
from swudi_jax.methods import optmerge as optmerge_mod
from swudi_jax.methods import swudi_family

GOLDEN_FAMILY = Path(__file__).resolve().parent / "data" / "golden_family.npz"
_Z = np.load(GOLDEN_FAMILY)
INDEX = json.loads(bytes(_Z["index.json"]).decode())
ENTRIES = {f"{e['case']}/{e['output']}": e for e in INDEX}


def case_models(case: str):
    """(base, experts, names) of one case as flat dicts of PyTorch-layout arrays."""
    names = sorted({k.split("/", 2)[2] for k in _Z.files if k.startswith(f"{case}/base/")})
    count = len({k.split("/")[1] for k in _Z.files if k.startswith(f"{case}/expert")})
    base = {k: _Z[f"{case}/base/{k}"] for k in names}
    experts = [{k: _Z[f"{case}/expert{i}/{k}"] for k in names} for i in range(count)]
    return base, experts, names


def layer_tau(case: str) -> np.ndarray:
    base, experts, _ = case_models(case)
    return np.stack([e["w"] - base["w"] for e in experts])


# ------------------------------------------------------------------- 1. the golden outputs


def test_the_index_covers_every_method_and_the_defaults():
    methods = {e["method"] for e in INDEX}
    assert methods == {"swudi", "swudi_a", "pinv", "iwudi", "optmerge"}
    assert {"e", "f", "g", "s", "model"} == {e["case"] for e in INDEX}
    for case in "efgs":
        for output in ("swudi_defaults", "swudi_a_defaults", "pinv_defaults"):
            assert ENTRIES[f"{case}/{output}"]["options"] == {}


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_family_output_matches_reference_implementation(key):
    entry = ENTRIES[key]
    case = entry["case"]
    base, experts, names = case_models(case)
    merged = sj.merge(base, experts, entry["method"], layout="torch", **entry["options"])
    worst = 0.0
    for name in names:
        got = np.asarray(merged[name])
        assert got.dtype == np.float32 and got.shape == base[name].shape
        worst = max(worst, rel_err(got - base[name], _Z[f"{case}/{entry['output']}/{name}"] - base[name]))
    assert worst <= entry["tolerance"], (key, worst)


def test_wudi2_is_the_reference_name_of_optmerge():
    base, experts, _ = case_models("e")
    a = sj.merge(base, experts, "wudi2", layout="torch", rank_ratio=0.5)
    b = sj.merge(base, experts, "optmerge", layout="torch", rank_ratio=0.5)
    np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(b["w"]))


def test_exponential_filter_matters_on_case_s_and_g():
    """At t = 1300 SWUDI differs from plain top-K on cases s and g (the golden set says 3.5%
    and 29%), so the golden match above does test the exponential filter."""
    for case, low in (("s", 0.02), ("g", 0.2)):
        tau = layer_tau(case)
        soft = sj.swudi(tau)
        hard = sj.swudi(tau, filter="none")
        assert rel_err(soft, hard) > low


# ---------------------------------------------------------------- 2. float64 identities


@pytest.mark.parametrize("shape", [(4, 6, 10), (3, 12, 5)])
def test_iwudi_landweber_is_sgd_at_the_matching_step(shape):
    # h = 1 − (1 − ηλ)^k, η = ρ/λ_max; WUDI's gradient is 2(θC − D), so SGD with lr η/2
    with jax.enable_x64(True):
        tau = tau64(1, shape)
        ratio, steps = 0.9, 150
        lam_max = float(swudi_family.layer_lambda_max(tau))
        landweber = sj.merge({"w": np.zeros(shape[1:])}, [{"w": t} for t in tau], "iwudi", layout="torch",
                             filter="landweber", steps=steps, eta_ratio=ratio)["w"]
        gd = sj.wudi_gd(tau, optimizer=optax.sgd(ratio / lam_max / 2.0), steps=steps, gradient="gram")
        assert landweber.dtype == jnp.float64
        assert rel_err(landweber, gd) <= 1e-12


def test_iwudi_exponential_at_large_time_is_pinv():
    with jax.enable_x64(True):
        tau = tau64(2, (4, 8, 10))
        # h = 1 − e^{−λt} = 1 to double precision once λ_min·t > 37 (λ clamped at 1e-8)
        big = iwudi_mod.iwudi(tau, filter="exponential", time=1e12)
        assert rel_err(big, sj.pinv_merge(tau)) <= 1e-12
        assert rel_err(iwudi_mod.iwudi(tau, filter="tikhonov", alpha=0.0), sj.pinv_merge(tau)) <= 1e-12


@pytest.mark.parametrize("shape,ratio", [((4, 6, 10), 0.65), ((3, 2, 9), 0.8), ((5, 9, 4), 0.5)])
def test_swudi_filter_none_is_swudi_a_forced_to_the_same_k(shape, ratio):
    with jax.enable_x64(True):
        tau = tau64(3, shape)
        k = filters.rank_from_ratio(ratio, shape[2])  # ⌈r·n⌉
        none = sj.swudi(tau, rank_ratio=ratio, filter="none")
        forced = {"rank_rule": "none", "max_rank_ratio": k / shape[2]}
        assert int(sj.swudi_a_rank(tau, **forced)) == k
        assert rel_err(none, sj.swudi_a(tau, **forced)) <= 1e-13
        # and the full-rank exponential SWUDI is IWUDI-exponential
        assert rel_err(sj.swudi(tau, time=300.0, rank_ratio=1.0), iwudi_mod.iwudi(tau, time=300.0)) <= 1e-13


@pytest.mark.parametrize("floor", rank_rules_family.WIENER_FLOORS)
def test_wiener_with_scale_to_zero_is_hard_swudi_a(floor):
    # h_k = λ^p / (λ^p + α ν̂²) = 1 − α ν̂²/λ^p + O(α²): the gap to the hard filter is linear in α
    with jax.enable_x64(True):
        tau = tau64(4, (5, 12, 16))  # C full rank (N·m = 60 > n = 16): no direction at the clamp
        hard = sj.swudi_a(tau)
        errors = [rel_err(sj.swudi_a(tau, filter="wiener", wiener_scale=a, wiener_floor=floor), hard)
                  for a in (1e-6, 1e-12)]
        assert errors[1] <= 2e-6 * errors[0] + 1e-15  # linear in α
        assert errors[-1] <= 1e-10
        assert rel_err(sj.swudi_a(tau, filter="wiener", wiener_scale=0.0, wiener_floor=floor), hard) <= 1e-14


def test_swudi_a_exponential_at_large_time_is_hard_swudi_a():
    with jax.enable_x64(True):
        tau = tau64(5, (4, 10, 12))
        assert rel_err(sj.swudi_a(tau, filter="exponential", time=1e12), sj.swudi_a(tau)) <= 1e-13


def test_alignment_with_the_layer_as_its_own_reference_is_plain_swudi():
    with jax.enable_x64(True):
        tau = tau64(6, (4, 10, 12))
        ref = float(swudi_family.layer_lambda_max(tau))
        lam = np.linalg.eigvalsh(sum(t.T @ t / np.sum(t * t) for t in tau))
        assert abs(ref - lam[-1]) <= 1e-12 * lam[-1]
        aligned = sj.swudi(tau, alignment=1.0, alignment_reference=ref)
        assert rel_err(aligned, sj.swudi(tau)) <= 1e-13
        # t_ℓ = t·(λ̄/λ_max)^ρ: a reference twice λ_max doubles t for ρ = 1
        assert rel_err(sj.swudi(tau, alignment=1.0, alignment_reference=2 * ref), sj.swudi(tau, time=2600.0)) <= 1e-13


def test_optmerge_loop_gradient_is_the_autodiff_gradient_and_the_closed_form_is_stationary():
    with jax.enable_x64(True):
        tau = tau64(7, (3, 9, 7))
        rank = optmerge_mod.optmerge_rank(tau.shape)
        q = optmerge_mod.optmerge_quadratic(jnp.asarray(tau), rank)
        theta = jnp.asarray(tau.sum(0))
        auto = jax.grad(optmerge_mod.optmerge_loss)(theta, tau, rank)
        assert rel_err(2.0 * (theta @ q.c - q.d), auto) <= 1e-12
        closed = optmerge_mod.optmerge_closed_form(tau)
        grad = jax.grad(optmerge_mod.optmerge_loss)(closed, tau, rank)
        assert float(jnp.linalg.norm(grad)) <= 1e-10 * float(jnp.linalg.norm(auto))
        adam = optmerge_mod.optmerge(tau)
        assert optmerge_mod.optmerge_loss(closed, tau, rank) <= optmerge_mod.optmerge_loss(adam, tau, rank)


# --------------------------------------------------- 3. output side, solvers, vmap, checks


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_output_filter_from_the_small_side_equals_the_direct_formula(dtype, tol):
    with jax.enable_x64(dtype == np.float64):
        tau = jnp.asarray(random_task_vectors(8, 3, 60, 5, dtype=dtype))  # N·n = 15 < m = 60
        theta = jnp.asarray(tau.sum(0))
        w = task_weights(tau)
        direct = swudi_family.output_filter(theta, tau, w, 300.0, path="direct")
        small = swudi_family.output_filter(theta, tau, w, 300.0, path="range")
        assert small.dtype == dtype
        assert rel_err(small, direct) <= tol
        if dtype == np.float64:  # the layer function takes the small side here (N·n < m)
            assert rel_err(sj.swudi(tau, output_time=300.0),
                           swudi_family.output_filter(sj.swudi(tau), tau, w, 300.0, path="direct")) <= tol


def test_output_filter_on_a_tall_layer_never_forms_the_m_by_m_matrix():
    n_tasks, m, n = 3, 20000, 16
    tau = random_task_vectors(9, n_tasks, m, n)
    fn = lambda t: sj.swudi(t, output_time=300.0)
    jaxpr = str(jax.make_jaxpr(fn)(tau))
    assert f"{m},{m}" not in jaxpr
    got = np.asarray(fn(tau), np.float64)
    # independent check: thin SVD of A = [√wi τi] (m × N·n) in float64, E = A Aᵀ = U S² Uᵀ
    t64 = tau.astype(np.float64)
    a = np.concatenate([t / np.sqrt(np.sum(t * t)) for t in t64], axis=1)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    theta = np.asarray(sj.swudi(tau), np.float64)
    g = -np.expm1(-np.maximum(s**2, 1e-8) * 300.0)
    g0 = -np.expm1(-1e-8 * 300.0)
    want = g0 * theta + u @ ((g - g0)[:, None] * (u.T @ theta))
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("method,options", [
    ("swudi", {"tikhonov_alpha": 0.01, "consensus_power": 1.0, "consensus_floor": 0.2, "gamma": 2.0, "time": 30.0}),
    ("swudi_a", {"rank_rule": "d_aware_entropy", "filter": "wiener"}),
    ("swudi_a", {"rank_rule": "wudi_risk", "rank_scale": 0.5}),
    ("iwudi", {"filter": "landweber"}),
])
def test_full_and_lowrank_solvers_agree(method, options):
    with jax.enable_x64(True):
        tau = tau64(10, (3, 4, 20))  # N·m = 12 < n = 20: C has 8 null directions
        fn = {"swudi": sj.swudi, "swudi_a": sj.swudi_a, "iwudi": iwudi_mod.iwudi}[method]
        full = fn(tau, solver="full", **options)
        assert rel_err(fn(tau, solver="lowrank", **options), full) <= 1e-9


def test_swudi_options_on_the_topk_path_agree_with_full():
    with jax.enable_x64(True):
        tau = tau64(11, (6, 40, 60))
        opts = {"rank_ratio": 0.1, "tikhonov_alpha": 0.01, "consensus_power": 1.0, "output_time": 300.0}
        assert rel_err(sj.swudi(tau, solver="topk", **opts), sj.swudi(tau, solver="full", **opts)) <= 1e-9


@pytest.mark.parametrize("fn", [
    lambda t: sj.swudi(t, tikhonov_alpha=0.01, output_time=300.0, consensus_power=1.0),
    lambda t: sj.swudi_a(t, rank_rule="loss_elbow", filter="wiener"),
    lambda t: iwudi_mod.iwudi(t, filter="tikhonov"),
    lambda t: optmerge_mod.optmerge(t, steps=20),
], ids=["swudi", "swudi_a", "iwudi", "optmerge"])
def test_family_layers_vmap_over_a_stack(fn):
    tau = np.stack([layer_tau("e"), 2.0 * layer_tau("e"), layer_tau("e")[::-1]])
    batched = jax.jit(jax.vmap(fn))(tau)
    for layer in range(3):
        assert rel_err(batched[layer], fn(tau[layer])) <= 1e-5


@pytest.mark.parametrize("method,options,match", [
    ("iwudi", {"filter": "ridge"}, r"filter must be one of \['exponential', 'landweber', 'tikhonov'\], got 'ridge'"),
    ("iwudi", {"eta_ratio": 0.0}, r"eta_ratio must be > 0.0, got 0.0"),
    ("iwudi", {"steps": 1.5}, r"steps must be an integer, got 1.5"),
    ("iwudi", {"solver": "topk"}, r"solver='topk' is not available for iwudi"),
    ("optmerge", {"rank_ratio": 0.0}, r"rank_ratio must be > 0.0, got 0.0"),
    ("wudi2", {"learning_rate": -1.0}, r"learning_rate must be > 0.0, got -1.0"),
    ("swudi", {"tikhonov_alpha": -0.1}, r"tikhonov_alpha must be >= 0.0, got -0.1"),
    ("swudi", {"output_time": -1.0}, r"output_time must be >= 0.0, got -1.0"),
    ("swudi", {"consensus_floor": 1.5}, r"consensus_floor must be <= 1.0, got 1.5"),
    ("swudi", {"filter": "wiener"}, r"filter must be one of \['exponential', 'none'\], got 'wiener'"),
    ("swudi", {"alignment": 3.0}, r"alignment must be <= 2.0, got 3.0"),
    ("swudi", {"alignment_reference": -1.0}, r"alignment_reference must be one finite number > 0"),
    ("swudi_a", {"rank_rule": "cumvar_x"}, r"rank_rule 'cumvar_x': the part after 'cumvar_' must be a fraction"),
    ("swudi_a", {"rank_rule": "wudi_risk_-1"}, r"must be a number > 0, got '-1'"),
    ("swudi_a", {"rank_scale": 0.0}, r"rank_scale must be > 0.0, got 0.0"),
    ("swudi_a", {"filter": "hard"}, r"filter must be one of \['exponential', 'none', 'wiener'\], got 'hard'"),
    ("swudi_a", {"wiener_power": 0.0}, r"wiener_power must be > 0.0, got 0.0"),
    ("swudi_a", {"wiener_floor": "tail_max"}, r"wiener_floor must be one of .*got 'tail_max'"),
])
def test_bad_family_options_are_refused_naming_the_option(method, options, match):
    base, experts, _ = case_models("e")
    with pytest.raises(ValueError, match=match):
        sj.merge(base, experts, method, layout="torch", **options)
    if method in ("swudi", "swudi_a"):
        with pytest.raises(ValueError, match=match):
            getattr(sj, method)(layer_tau("e"), **options)


def test_alignment_without_a_reference_is_refused_at_the_layer():
    with pytest.raises(ValueError, match=r"alignment > 0 needs alignment_reference"):
        sj.swudi(layer_tau("e"), alignment=0.5)


def test_family_defaults_keep_the_paper_methods_bit_identical():
    tau = layer_tau("g")
    swudi_off = dict(tikhonov_alpha=0.0, output_time=None, consensus_power=0.0, consensus_floor=0.0, gamma=1.0,
                     filter="exponential", alignment=0.0, alignment_reference=None)
    swudi_a_off = dict(rank_scale=1.0, filter="none", time=1e6, wiener_scale=1.0, wiener_power=2.0,
                       wiener_floor="tail_mean")
    np.testing.assert_array_equal(np.asarray(sj.swudi(tau, **swudi_off)), np.asarray(sj.swudi(tau)))
    np.testing.assert_array_equal(np.asarray(sj.swudi_a(tau, **swudi_a_off)), np.asarray(sj.swudi_a(tau)))


def test_the_sharded_path_refuses_what_needs_tau_and_auto_keeps_it_dense():
    base, experts, _ = case_models("e")
    with pytest.raises(ValueError, match=r"consensus_power > 0, output_time or a D-aware / loss rank_rule needs the "
                                         r"dense layer path \(multi_device=False\)"):
        sj.merge(base, experts, "swudi", layout="torch", multi_device=True, consensus_power=1.0)
    with pytest.raises(ValueError, match=r"needs the dense layer path \(multi_device=False\)"):
        sj.merge(base, experts, "swudi_a", layout="torch", multi_device=True, rank_rule="wudi_risk")
    dense = sj.merge(base, experts, "swudi", layout="torch", multi_device="auto", output_time=300.0)["w"]
    assert rel_err(dense, sj.swudi(layer_tau("e"), output_time=300.0)) <= 1e-5


@pytest.mark.parametrize("method,options", [
    ("swudi", {"tikhonov_alpha": 0.01, "gamma": 2.0, "time": 30.0, "alignment": 0.5, "alignment_reference": 0.3}),
    ("swudi", {"filter": "none", "rank_ratio": 0.1}),  # K = 4 <= rank C = 6: no direction at the clamp
    ("swudi_a", {"rank_rule": "cumvar_0.9", "filter": "wiener", "wiener_floor": "tail_median", "rank_scale": 0.8}),
])
def test_eigenvalue_only_family_options_run_on_the_sharded_and_lora_paths(method, options):
    from swudi_jax.scale.sharding import make_row_mesh, merge_sharded

    rng = np.random.default_rng(12)
    factors = [(rng.normal(size=(24, 2)).astype(np.float32), rng.normal(size=(2, 40)).astype(np.float32))
               for _ in range(3)]
    tau = np.stack([b @ a for b, a in factors])
    dense = getattr(sj, method)(tau, solver="full", **options)
    assert rel_err(merge_sharded(tau, make_row_mesh(), method, **options), dense) <= 1e-5
    assert rel_err(sj.merge_lora(factors, method, **options), dense) <= 1e-4


# ------------------------------------------------- 5. the alignment pass through the stage layout


def test_the_alignment_pass_reads_linear_leaves_in_maths_layout():
    """SWUDI's prepare hook asks for the linear leaves' maths-layout stacks: a scanned Flax stack
    comes as (layers, N, m, n) with m the outputs, and bias / norm leaves are not read."""
    from swudi_jax.model import merger

    rng = np.random.default_rng(3)
    base = {"blocks": {"kernel": rng.normal(size=(2, 6, 4)).astype(np.float32),
                       "bias": rng.normal(size=(2, 4)).astype(np.float32)}}
    experts = [jax.tree_util.tree_map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), base)
               for _ in range(3)]
    base_flat = sj.model.flat.flatten(base)[0]
    plans = merger.plan_tree({k: (v.shape, v.dtype) for k, v in base_flat.items()}, layout="flax",
                             scan_patterns=("blocks/*",))
    expert_flats = [sj.model.flat.flatten(e)[0] for e in experts]
    chunks = merger.model_task_vector_chunks(plans, base_flat, expert_flats)
    stacks = list(chunks("linear_maths"))
    assert [s.shape for s in stacks] == [(2, 3, 4, 6)]  # (layers, N, m = outputs, n = inputs)
    tau = np.stack([e["blocks"]["kernel"] - base["blocks"]["kernel"] for e in experts], axis=1)  # (L, N, in, out)
    np.testing.assert_allclose(np.asarray(stacks[0]), np.swapaxes(tau, -1, -2), rtol=0, atol=0)
    assert len(list(chunks("merged"))) == 2 and len(list(chunks())) == 2
    spec = sj.get_method("swudi")
    prep = spec.preparation(spec.resolve({"alignment": 0.5}))
    assert prep.leaves == "linear_maths"
    want = swudi_family.alignment_reference(
        [swudi_family.layer_lambda_max(np.swapaxes(tau[layer], -1, -2)) for layer in range(2)])
    got = merger.prepare(spec.bind({"alignment": 0.5}), chunks).options["alignment_reference"]
    assert got == pytest.approx(want, rel=1e-6)
    assert spec.preparation(spec.resolve({"alignment": 0.5, "alignment_reference": got})) is None


def test_swudi_merge_runs_the_alignment_pass_from_disk(tmp_path):
    import yaml

    from swudi_jax.checkpoint import io as ckio

    entry = ENTRIES["model/swudi_alignment_0.5"]
    base, experts, names = case_models("model")
    ckio.save(tmp_path / "base.safetensors", base)
    for i, expert in enumerate(experts):
        ckio.save(tmp_path / f"e{i}.safetensors", expert)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({
        "base_model": "base.safetensors", "models": [f"e{i}.safetensors" for i in range(len(experts))],
        "merge_method": "swudi", "parameters": entry["options"], "layout": "torch"}))
    out = sj.merge_checkpoints(tmp_path / "merge.yaml", tmp_path / "out", progress=False)
    got = ckio.load(ckio.weights_path(out, "safetensors"))
    for name in names:
        assert rel_err(got[name] - base[name], _Z[f"model/{entry['output']}/{name}"] - base[name]) <= entry["tolerance"]
