"""mergekit's methods in JAX against an independent NumPy transcription (tests/mergekit_reference.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import half_reference as half
import mergekit_reference as ref
import numpy as np
import pytest

from swudi_jax.methods import interpolation as ip
from swudi_jax.methods import mergekit_family as mf
from swudi_jax.methods import mergekit_selective as msel
from swudi_jax.methods import sparsify as sp

N, SHAPE = 3, (5, 8)
WEIGHTS = [1.0, 0.5, 0.7]
DENSITIES = [0.3, 0.5, 0.7]

FAMILY_FNS = {
    "task_arithmetic": mf.task_arithmetic, "ties": mf.ties, "dare_ties": mf.dare_ties,
    "dare_linear": mf.dare_linear, "breadcrumbs": mf.breadcrumbs, "breadcrumbs_ties": mf.breadcrumbs_ties,
    "della": mf.della, "della_linear": mf.della_linear,
}
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def conflicting_task_vectors(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Task vectors whose large entries disagree in sign between models (kept by any trim)."""
    rng = np.random.default_rng(seed)
    tau = rng.normal(size=(N,) + shape).astype(np.float32) * 0.1
    tau[1].flat[:6] = -1.5 * tau[0].flat[:6] + np.sign(-tau[0].flat[:6]) * 0.3
    tau[0].flat[:6] += np.sign(tau[0].flat[:6]) * 0.3
    return tau


def family_kwargs(name: str, case: dict) -> tuple[dict, dict]:
    """(JAX keyword arguments, reference keyword arguments) for one method and case."""
    jx, rf = {"weight": case["weights"]}, {}
    if name != "task_arithmetic":
        jx["density"] = case["densities"]
        rf["densities"] = case["densities"]
    if "breadcrumbs" in name:
        jx["gamma"] = case["gamma"]
        rf["gammas"] = [case["gamma"]] * N
    if "della" in name:
        jx["epsilon"] = case["epsilon"]
        rf["epsilons"] = [case["epsilon"]] * N
    for key in ("normalize", "rescale"):
        if key in case and not (key == "rescale" and name == "task_arithmetic"):
            jx[key] = rf[key] = case[key]
    if "lam" in case:
        jx["lam"], rf["lam"] = case["lam"], case["lam"]
    if name in RANDOM:
        jx["uniforms"] = case["uniforms"]
        rf["uniforms"] = case["uniforms"]
    return jx, rf


CASES = [
    dict(weights=WEIGHTS, densities=DENSITIES, gamma=0.1, epsilon=0.1),
    dict(weights=[1.0, 1.0, 1.0], densities=[0.5] * 3, gamma=0.05, epsilon=0.2, normalize=True, lam=0.8),
    dict(weights=[0.3, 1.2, 0.6], densities=[0.6, 0.4, 0.25], gamma=0.0, epsilon=0.15, normalize=False,
         rescale=False),
    dict(weights=WEIGHTS, densities=[1.0, 0.5, 0.4], gamma=0.2, epsilon=0.1, rescale="keep_prob"),
]


@pytest.mark.parametrize("case_index", range(len(CASES)))
@pytest.mark.parametrize("name", sorted(FAMILY_FNS))
def test_task_family_matches_numpy_transcription(name, case_index):
    case = dict(CASES[case_index])
    if case.get("rescale") == "keep_prob" and name not in RANDOM:
        case.pop("rescale")
    case["uniforms"] = np.random.default_rng(100 + case_index).random((N,) + SHAPE).astype(np.float32)
    tau = conflicting_task_vectors(case_index)
    jx, rf = family_kwargs(name, case)
    got = np.asarray(FAMILY_FNS[name](jnp.asarray(tau), **jx))
    want = ref.task_family(name, tau, case["weights"], **rf)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_ties_family_data_has_sign_conflicts_among_kept_entries():
    tau = conflicting_task_vectors(0)
    kept = [np.array(ref.keep_top_magnitudes(list(t.ravel()), d)) for t, d in zip(tau, DENSITIES)]
    signs = [np.where(k, np.sign(t.ravel()), 0) for k, t in zip(kept, tau)]
    conflicts = np.any(np.array(signs) > 0, axis=0) & np.any(np.array(signs) < 0, axis=0)
    assert conflicts.sum() >= 3
    # and the election matters: the disjoint mean differs from the plain mean there
    merged = np.asarray(mf.ties(jnp.asarray(tau), weight=[1.0] * N, density=DENSITIES)).ravel()
    plain = np.asarray(mf.generalized_task_arithmetic(
        jnp.asarray(tau), [1.0] * N, density=DENSITIES, sparsification="magnitude", normalize=True)).ravel()
    assert np.all(np.abs(merged[conflicts] - plain[conflicts]) > 1e-3)


def test_count_election_matches_transcription():
    tau = conflicting_task_vectors(3)
    got = mf.generalized_task_arithmetic(jnp.asarray(tau), WEIGHTS, density=DENSITIES, sparsification="magnitude",
                                         consensus="count", normalize=True)
    want = ref.task_family("ties", tau, WEIGHTS, DENSITIES, election="count")
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


def test_sign_election_tie_elects_plus():
    tau = np.array([[1.0, -2.0], [-1.0, 2.0]], np.float32)  # both sums are exactly 0
    got = np.asarray(mf.ties(jnp.asarray(tau), weight=[1.0, 1.0]))
    np.testing.assert_array_equal(got, [1.0, 2.0])


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.3])
def test_sce_matches_transcription(select_topk):
    tau = conflicting_task_vectors(5)
    got = np.asarray(mf.sce(jnp.asarray(tau), select_topk=select_topk))
    np.testing.assert_allclose(got, ref.sce(tau, select_topk), rtol=2e-5, atol=2e-6)


def test_sce_small_deltas_get_equal_weights():
    tau = conflicting_task_vectors(6) * 1e-4  # Σ mean(τ²) < 1e-6: mergekit falls back to 1/N
    got = np.asarray(mf.sce(jnp.asarray(tau)))
    np.testing.assert_allclose(got, ref.sce(tau), rtol=2e-5, atol=1e-10)


def test_linear_matches_transcription_and_rejects_zero_sum():
    models = np.random.default_rng(7).normal(size=(4,) + SHAPE).astype(np.float32)
    w = [1.0, 0.5, 0.25, 2.0]
    np.testing.assert_allclose(np.asarray(mf.linear(jnp.asarray(models), w)), ref.linear(models, w), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mf.linear(jnp.asarray(models), w, normalize=False)),
                               ref.linear(models, w, normalize=False), rtol=1e-6)
    with pytest.raises(ValueError, match="sum to 0"):
        mf.linear(jnp.asarray(models), [1.0, -1.0, 0.5, -0.5])


def test_passthrough_scales_one_tensor():
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(np.asarray(mf.passthrough(x)), np.asarray(x))
    np.testing.assert_allclose(np.asarray(mf.passthrough(x, 0.5)), np.asarray(x) * 0.5)


# ----------------------------------------------------------------------------- sparsifiers


def test_host_counts_follow_mergekits_float64_truncation():
    # 0.29·100 is 28.999999999999996 in float64 (mergekit keeps 28), 29.0 in float32
    tau = jnp.asarray(np.random.default_rng(8).normal(size=(2, 100)).astype(np.float32))
    kept = np.asarray(sp.sparsify(tau, "magnitude", [0.29, 0.5]))
    assert [(kept[i] != 0).sum() for i in range(2)] == [28, 50]
    assert sp.rank_windows("magnitude_outliers", [0.29], 100, [0.1]).tolist() == [[62, 90]]  # 100 - 28 - 10


def test_magnitude_ties_keep_the_earlier_entry():
    tau = jnp.asarray([[1.0, -2.0, 2.0, 0.5], [0.0, 0.0, 1.0, 1.0]])
    kept = np.asarray(sp.sparsify(tau, "magnitude", 0.25))
    np.testing.assert_array_equal(kept, [[0.0, -2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])


def test_random_masks_are_deterministic_given_the_key():
    tau = jnp.asarray(conflicting_task_vectors(9))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = np.asarray(mf.dare_ties(tau, weight=WEIGHTS, density=0.5, key=k1))
    np.testing.assert_array_equal(a, np.asarray(mf.dare_ties(tau, weight=WEIGHTS, density=0.5, key=k1)))
    assert not np.array_equal(a, np.asarray(mf.dare_ties(tau, weight=WEIGHTS, density=0.5, key=k2)))
    u = sp.draw_uniforms(k1, tau.shape)
    np.testing.assert_array_equal(a, np.asarray(mf.dare_ties(tau, weight=WEIGHTS, density=0.5, uniforms=u)))


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_rescale_restores_each_models_norm(norm):
    tau = jnp.asarray(conflicting_task_vectors(10))
    out = np.asarray(sp.sparsify(tau, "random", 0.5, rescale=norm, key=jax.random.key(0)))
    order = {"l1": 1, "l2": 2, "linf": np.inf}[norm]
    for i in range(N):
        assert np.isclose(np.linalg.norm(out[i].ravel(), order), np.linalg.norm(np.asarray(tau[i]).ravel(), order),
                          rtol=1e-5)


def test_breadcrumbs_drops_outliers_and_small_entries():
    tau = jnp.asarray(np.arange(1, 21, dtype=np.float32)[None].repeat(2, 0))
    out = np.asarray(sp.sparsify(tau, "magnitude_outliers", 0.5, gamma=0.1))
    np.testing.assert_array_equal(np.flatnonzero(out[0]) + 1, np.arange(9, 19))


def test_della_keep_probability_spans_density_plus_minus_epsilon():
    tau = jnp.asarray(conflicting_task_vectors(11))
    probs = ref.della_keep_probabilities(np.asarray(tau[0]), 0.5, 0.2)
    assert np.isclose(probs.min(), 0.3) and np.isclose(probs.max(), 0.7)
    # u just above / below each p: keep iff u < p
    below = np.asarray(sp.sparsify(tau[:1], "della_magprune", 0.5, epsilon=0.2, uniforms=probs[None] - 1e-4))
    above = np.asarray(sp.sparsify(tau[:1], "della_magprune", 0.5, epsilon=0.2, uniforms=probs[None] + 1e-4))
    assert np.all(below != 0) and np.all(above == 0)


def test_bad_parameters_are_value_errors():
    tau = jnp.asarray(conflicting_task_vectors(12))
    with pytest.raises(ValueError, match="epsilon"):
        mf.della(tau, weight=WEIGHTS, density=0.1, epsilon=0.15, key=jax.random.key(0))
    with pytest.raises(ValueError, match="PRNG key"):
        mf.dare_linear(tau, weight=WEIGHTS, density=0.5)
    with pytest.raises(ValueError, match="weight"):
        mf.ties(tau, weight=[1.0, 1.0], density=0.5)
    with pytest.raises(ValueError, match="rescale"):
        mf.ties(tau, weight=WEIGHTS, density=0.5, rescale="l3")
    with pytest.raises(ValueError, match="density"):
        mf.ties(tau, weight=WEIGHTS, density=-0.5)


# ----------------------------------------------------------------------------- vmap, bf16


def test_vmap_over_stacked_tensors_with_per_tensor_parameters_equals_a_loop():
    g = 3
    stack = jnp.asarray(np.stack([conflicting_task_vectors(20 + i) for i in range(g)]))
    weights = jnp.asarray([[1.0, 0.5, 0.7], [0.2, 0.9, 1.0], [1.0, 1.0, 1.0]])
    dens = jnp.asarray([[0.3, 0.5, 0.7], [0.25, 0.5, 0.75], [0.6, 0.6, 0.6]])
    keys = jax.random.split(jax.random.key(3), g)
    fns = {
        "ties": lambda t, w, d, k: mf.ties(t, weight=w, density=d),
        "della": lambda t, w, d, k: mf.della(t, weight=w, density=d, epsilon=0.1, key=k),
    }
    for name, fn in fns.items():
        batched = np.asarray(jax.jit(jax.vmap(fn))(stack, weights, dens, keys))
        looped = np.stack([np.asarray(fn(stack[i], weights[i], np.asarray(dens[i]), keys[i])) for i in range(g)])
        np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7, err_msg=name)
    # exact host counts per tensor (rank_windows) ride along the vmapped axis
    wins = jnp.asarray(np.stack([sp.rank_windows("magnitude", [0.29, 0.5, 0.7], 40) for _ in range(g)]))
    batched = np.asarray(jax.vmap(lambda t, w, win: mf.ties(t, weight=w, windows=win))(stack, weights, wins))
    looped = np.stack([np.asarray(mf.ties(stack[i], weight=weights[i], density=[0.29, 0.5, 0.7])) for i in range(g)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)
    t = jnp.asarray([0.1, 0.5, 0.9])
    batched = np.asarray(jax.vmap(ip.slerp)(stack[:, 0], stack[:, 1], t))
    looped = np.stack([np.asarray(ip.slerp(stack[i, 0], stack[i, 1], float(t[i]))) for i in range(g)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)
    batched = np.asarray(jax.vmap(lambda b, m: ip.model_stock(b, m))(stack[:, 0], stack[:, 1:]))
    looped = np.stack([np.asarray(ip.model_stock(stack[i, 0], stack[i, 1:])) for i in range(g)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)


def _bf16_grid_task_vectors(seed: int, shape=(4, 9)) -> np.ndarray:
    """Multiples of 1/16 in [-1, 1] with sign conflicts: exact in bf16, as are their weighted sums."""
    rng = np.random.default_rng(seed)
    tau = rng.integers(-16, 17, size=(N,) + shape).astype(np.float32) / 16
    tau[1].flat[:5] = -tau[0].flat[:5]
    return tau


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(FAMILY_FNS))
def test_half_precision_task_family_matches_transcription_to_one_rounding(name, dtype):
    dtype = jnp.dtype(dtype)
    tau = _bf16_grid_task_vectors(30)
    u = np.random.default_rng(31).random(tau.shape).astype(np.float32)
    # densities, epsilons and weights whose keep probabilities and products are exact in bf16
    case = dict(weights=[1.0, 0.5, 0.25], densities=[0.5, 0.75, 0.625], gamma=0.125, epsilon=0.25,
                uniforms=u, lam=0.75)
    if "della" in name:
        case["densities"] = [0.5, 0.5, 0.5]
    jx, rf = family_kwargs(name, case)
    out = FAMILY_FNS[name](jnp.asarray(tau, dtype), **jx)
    assert out.dtype == dtype
    got = np.asarray(out).astype(np.float64)
    want = ref.task_family(name, tau, case["weights"], bf16=dtype == jnp.bfloat16, **rf)
    want = ref.bf16_round(want) if dtype == jnp.bfloat16 else want.astype(np.float16).astype(np.float64)
    # exact grid values: only divisions, λ and (for DARE/DELLA) the rescale ratio round; the
    # L1 ratio's bf16 rounding (mergekit rounds it too) moves entries by a few bf16 ulps of the scale
    atol = 2 ** -6 if name in RANDOM else 2 ** -12
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=atol)


# ----------------------------------------------------------------------------- interpolation


def _models(seed: int, n: int = 3, shape=SHAPE):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    return base, (base[None] + 0.3 * rng.normal(size=(n,) + shape)).astype(np.float32)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_shoemake(t):
    base, models = _models(40)
    np.testing.assert_allclose(np.asarray(ip.slerp(base, models[0], t)), ref.slerp(t, base, models[0]),
                               rtol=1e-5, atol=1e-6)
    near = base * 1.001  # parallel: falls back to lerp
    np.testing.assert_allclose(np.asarray(ip.slerp(base, near, t)), (1 - t) * base + t * near, rtol=1e-6)


@pytest.mark.parametrize("with_base,row_wise,flatten", [(True, False, True), (False, False, True),
                                                         (True, False, False), (False, True, False)])
def test_nuslerp_matches_transcription(with_base, row_wise, flatten):
    base, models = _models(41, n=2)
    w = [0.3, 0.9]
    got = ip.nuslerp(models, w, base if with_base else None, row_wise=row_wise, flatten=flatten)
    want = ref.nuslerp(models, w, base if with_base else None, row_wise=row_wise, flatten=flatten)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_transcription(with_base):
    base, models = _models(42, n=4)
    w = [1.0, 0.5, 0.7, 0.2]
    got = ip.multislerp(models, w, base if with_base else None)
    np.testing.assert_allclose(np.asarray(got), ref.multislerp(models, w, base if with_base else None),
                               rtol=1e-5, atol=1e-6)


def test_karcher_matches_transcription_and_fixes_the_mean_direction():
    _, models = _models(43, n=4)
    got = np.asarray(ip.karcher(models, max_iter=50))
    np.testing.assert_allclose(got, ref.karcher(models, max_iter=50), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ip.karcher(models)), ref.karcher(models), rtol=1e-5, atol=1e-6)
    # at the Karcher mean the weighted log-map sum vanishes
    mu = got.ravel() / np.linalg.norm(got)
    step = np.zeros_like(mu)
    for m in models.reshape(4, -1):
        u = m / np.linalg.norm(m)
        c = np.clip(u @ mu, -1, 1)
        step += np.arccos(c) / np.sin(np.arccos(c)) * (u - c * mu)
    assert np.linalg.norm(step) < 1e-4


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_transcription(filter_wise):
    base, models = _models(44, n=3)
    got = ip.model_stock(base, models, filter_wise=filter_wise)
    np.testing.assert_allclose(np.asarray(got), ref.model_stock(base, models, filter_wise), rtol=1e-5, atol=1e-6)


def test_nearswap_matches_transcription():
    base, models = _models(45, n=1)
    for t in (0.01, 0.2, 5.0):
        np.testing.assert_allclose(np.asarray(ip.nearswap(base, models[0], t)), ref.nearswap(base, models[0], t),
                                   rtol=1e-6, atol=1e-7)


def test_bf16_interpolation_rounds_each_operation_as_pytorch():
    """bf16 inputs: every operation rounded as mergekit's PyTorch code rounds it (NumPy
    transcription in ``half_reference``); slerp works in float32 and rounds once."""
    base, models = _models(46, n=3)
    b16, m16 = jnp.asarray(base, jnp.bfloat16), jnp.asarray(models, jnp.bfloat16)
    b, m = np.asarray(b16, np.float64), np.asarray(m16, np.float64)
    pairs = [
        (ip.slerp(b16, m16[0], 0.3), ref.bf16_round(ref.slerp(0.3, b, m[0]))),
        (ip.nuslerp(m16[:2], [0.3, 0.9], b16), half.nuslerp(m[:2], [0.3, 0.9], b)),
        (ip.nuslerp(m16[:2], [0.3, 0.9], flatten=False, row_wise=True),
         half.nuslerp(m[:2], [0.3, 0.9], flatten=False, row_wise=True)),
        (ip.multislerp(m16, WEIGHTS, b16), half.multislerp(m, WEIGHTS, b)),
        (ip.karcher(m16), half.karcher(m)),
        (ip.model_stock(b16, m16), half.model_stock(b, m).reshape(b.shape)),
        (ip.nearswap(b16, m16[0], 0.2), half.nearswap(b, m[0], 0.2)),
    ]
    for got, want in pairs:
        assert got.dtype == jnp.bfloat16
        got = np.asarray(got, np.float64)
        # float32 sums may be ordered differently: at most one bf16 unit apart, and rarely
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)
        assert np.mean(got == want) >= 0.95


# ----------------------------------------------------------------------------- selection


def _sparse_task_vectors(seed: int) -> np.ndarray:
    """Task vectors that touch overlapping and disjoint entries (others below ε)."""
    rng = np.random.default_rng(seed)
    tau = rng.normal(size=(N,) + SHAPE).astype(np.float32) * 0.1
    tau *= rng.random(tau.shape) < 0.4
    tau += 1e-6 * rng.normal(size=tau.shape).astype(np.float32)  # below ε: not "touched"
    return tau


@pytest.mark.parametrize("plus", [False, True])
def test_ram_matches_transcription(plus):
    tau = _sparse_task_vectors(60)
    got = msel.ramplus_tl(jnp.asarray(tau), r=0.5, alpha=0.3) if plus else msel.ram(jnp.asarray(tau))
    want = ref.ram(tau, plus=plus, r=0.5, alpha=0.3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)


def test_arcee_fusion_matches_transcription():
    base, models = _models(61, n=1)
    other = models[0].copy()
    other[1] += 2.0  # one row with a large distribution shift
    np.testing.assert_allclose(np.asarray(msel.arcee_fusion(base, other)), ref.arcee_fusion(base, other),
                               rtol=1e-6, atol=1e-7)
    changed = np.asarray(msel.arcee_fusion(base, other)) != base
    assert 0 < changed.sum() < base.size
