"""Merging LoRA experts from their factors equals the dense method on B·A, in float64."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import rel_err

import swudi_jax as sj
from swudi_jax.scale.lora import merge_lora

RULES = ["participation_sqrt", "entropy", "participation", "stable_rank", "gavish_donoho"]


def lora_experts(seed, ranks=(2, 3, 4), m=24, n=80, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(m, r)).astype(dtype), (rng.normal(size=(r, n)) / 10).astype(dtype)) for r in ranks]


def dense(factors):
    return np.stack([b @ a for b, a in factors])


CASES = {
    "swudi": ({}, lambda t: sj.swudi(t, solver="full")),
    "swudi_llm_mean": ({"time": 300.0, "rank_ratio": 0.1, "init": "mean"},
                       lambda t: sj.swudi(t, time=300.0, rank_ratio=0.1, init="mean", solver="full")),
    "swudi_zero": ({"init": "zero"}, lambda t: sj.swudi(t, init="zero", solver="full")),
    **{f"swudi_a_{r}": ({"rank_rule": r}, lambda t, r=r: sj.swudi_a(t, rank_rule=r, solver="full")) for r in RULES},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_factored_merge_equals_dense_merge_of_the_products(case):
    options, reference = CASES[case]
    method = "swudi_a" if case.startswith("swudi_a") else "swudi"
    with jax.enable_x64(True):
        factors = lora_experts(0)
        got = merge_lora(factors, method, **options)
        assert got.dtype == np.float64 and got.shape == (24, 80)
        assert rel_err(got, reference(dense(factors))) <= 1e-11


def test_factored_pinv_is_the_exact_pseudo_inverse_solution():
    with jax.enable_x64(True):
        factors = lora_experts(1)
        eq = sj.normal_equation(dense(factors))
        exact = np.asarray(eq.d) @ np.linalg.pinv(np.asarray(eq.c), rcond=1e-10, hermitian=True)
        assert rel_err(merge_lora(factors, "pinv"), exact) <= 1e-12


def test_float32_factors_give_a_float32_merge_close_to_the_dense_one():
    factors = lora_experts(2, dtype=np.float32)
    got = merge_lora(factors, "swudi", time=300.0, rank_ratio=0.1)
    assert got.dtype == np.float32
    with jax.enable_x64(True):
        want = sj.swudi(dense(factors).astype(np.float64), time=300.0, rank_ratio=0.1)
    assert rel_err(got, want) <= 1e-4


def test_ranks_above_n_use_the_dense_path_with_the_same_result():
    with jax.enable_x64(True):
        factors = lora_experts(3, ranks=(8, 8, 8), m=10, n=16)  # Σ r = 24 > n = 16
        got = merge_lora(factors, "swudi")
        assert rel_err(got, sj.swudi(dense(factors), solver="full")) <= 1e-12


def test_disagreeing_ranks_are_rejected_naming_the_expert():
    factors = lora_experts(4)
    factors[1] = (factors[1][0], factors[1][1][:2])
    with pytest.raises(ValueError, match="expert 1: ranks disagree"):
        merge_lora(factors)


def test_disagreeing_shapes_are_rejected_naming_the_expert():
    factors = lora_experts(5)
    factors[2] = (factors[2][0][:10], factors[2][1])
    with pytest.raises(ValueError, match=r"expert 2: delta shape"):
        merge_lora(factors)


def test_bad_factor_lists_and_options_are_rejected():
    factors = lora_experts(6)
    with pytest.raises(ValueError, match="at least 2"):
        merge_lora(factors[:1])
    with pytest.raises(ValueError, match="expert 0: expected a pair"):
        merge_lora([factors[0][0], factors[1]])
    with pytest.raises(ValueError, match="method"):
        merge_lora(factors, "ties_paper")
    with pytest.raises(ValueError, match="rank_ratio"):
        merge_lora(factors, "swudi", rank_ratio=1.5)
    with pytest.raises(ValueError, match="no option"):
        merge_lora(factors, "pinv", time=3.0)
    bad = [(b.copy(), a.copy()) for b, a in factors]
    bad[1][1][0, 0] = np.nan
    with pytest.raises(ValueError, match="expert 1 A"):
        merge_lora(bad)


def test_all_zero_experts_get_the_mean():
    factors = [(np.zeros((4, 2), np.float32), np.ones((2, 9), np.float32)),
               (np.zeros((4, 1), np.float32), np.ones((1, 9), np.float32))]
    np.testing.assert_array_equal(merge_lora(factors), np.zeros((4, 9), np.float32))


def test_per_expert_weights_scale_the_experts():
    with jax.enable_x64(True):
        factors = lora_experts(7)
        weights = [0.5, 2.0, -1.0]
        weighted = np.stack([w * b @ a for w, (b, a) in zip(weights, factors)])
        got = merge_lora(factors, "swudi", weight=weights)
        assert rel_err(got, sj.swudi(weighted, solver="full")) <= 1e-11


@pytest.mark.parametrize("method, options", [("swudi", {"time": 300.0, "rank_ratio": 0.85}), ("swudi_a", {}),
                                             ("pinv", {}), ("iwudi", {"filter": "tikhonov", "alpha": 0.01})])
def test_merged_factors_multiply_to_the_merge_and_have_rank_sum(method, options):
    with jax.enable_x64(True):
        factors = lora_experts(8)
        b, a = sj.lora.merge_lora_factors(factors, method, **options)
        assert b.shape == (24, 9) and a.shape == (9, 80)  # ranks 2 + 3 + 4
        assert rel_err(b @ a, merge_lora(factors, method, **options)) <= 1e-11
        # the dense reference on C's range ("lowrank": N·m = 72 <= n); "full" would divide C's null-space
        # rounding noise by the 1e-8 floor for pinv
        assert rel_err(b @ a, sj.get_method(method).fn(dense(factors), solver="lowrank", **options)) <= 1e-10


def test_an_expert_that_does_not_touch_the_weight_is_a_zero_task_vector():
    with jax.enable_x64(True):
        factors = lora_experts(9)
        pairs = [factors[0], None, factors[2]]
        for init in ("sum", "mean"):
            resolved = sj.resolve("swudi", {"init": init})
            b, a = sj.lora.spectral_factors(pairs, resolved, (24, 80))
            stack = np.stack([factors[0][0] @ factors[0][1], np.zeros((24, 80)), factors[2][0] @ factors[2][1]])
            assert rel_err(b @ a, sj.swudi(stack, init=init, solver="full")) <= 1e-10


def test_truncated_factors_are_the_best_rank_r_approximation():
    with jax.enable_x64(True):
        rng = np.random.default_rng(10)
        b, a = rng.normal(size=(30, 12)), rng.normal(size=(12, 50))
        u, s, vt = np.linalg.svd(b @ a)
        b5, a5, sigma = sj.lora.truncate_factors(b, a, 5)
        assert b5.shape == (30, 5) and a5.shape == (5, 50)
        np.testing.assert_allclose(sigma, s[:12], rtol=1e-10)
        assert rel_err(b5 @ a5, (u[:, :5] * s[:5]) @ vt[:5]) <= 1e-10
        assert np.linalg.norm(b @ a - b5 @ a5) == pytest.approx(np.sqrt(np.sum(s[5:12] ** 2)), rel=1e-10)
        b20, a20, _ = sj.lora.truncate_factors(b, a, 20)  # more than the rank: exact
        assert b20.shape == (30, 12) and rel_err(b20 @ a20, b @ a) <= 1e-12
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            sj.lora.truncate_factors(b, a, 0)


def test_combined_factors_are_the_weighted_sum():
    factors = lora_experts(11)
    b, a = sj.lora.combine_factors([factors[0], None, factors[2]], [0.5, 3.0, -2.0])
    assert b.shape == (24, 6)
    want = 0.5 * factors[0][0] @ factors[0][1] - 2.0 * factors[2][0] @ factors[2][1]
    assert rel_err(b @ a, want) <= 1e-6
