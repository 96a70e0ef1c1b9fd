"""swudi_jax reproduces the SWUDI authors' own implementation (float32 on both sides).

Tolerances from the reference README: relative Frobenius error ≤ 5e-5 for SWUDI, SWUDI-A
and WUDI, ≤ 1e-3 for the pseudo-inverse (its small eigenvalues amplify float32 rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err

import swudi_jax as sj

CASES = ["a", "b", "c", "d"]
RULES = ["participation_sqrt", "entropy", "participation", "stable_rank", "gavish_donoho"]


LAYER_CALLS = {
    "swudi_t1300_r0.65": lambda t: sj.swudi(t),
    "swudi_t300_r0.85": lambda t: sj.swudi(t, **sj.LLM_PRESET),
    "swudi_t300_r1.0": lambda t: sj.swudi(t, time=300.0, rank_ratio=1.0),
    "swudi_t1300_r0.65_init_zero": lambda t: sj.swudi(t, init="zero"),
    "wudi_adam300": lambda t: sj.wudi_gd(t),
    **{f"swudi_a_{r}": (lambda t, r=r: sj.swudi_a(t, rank_rule=r)) for r in RULES},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("output", sorted(LAYER_CALLS))
def test_layer_matches_reference_implementation(golden, case, output):
    tau = golden[f"{case}/tau"]
    got = LAYER_CALLS[output](tau)
    assert got.dtype == np.float32 and got.shape == tau.shape[1:]
    assert rel_err(got, golden[f"{case}/{output}"]) <= 5e-5


@pytest.mark.parametrize("case", CASES)
def test_pinv_matches_reference_implementation(golden, case):
    assert rel_err(sj.pinv_merge(golden[f"{case}/tau"]), golden[f"{case}/pinv"]) <= 1e-3


@pytest.mark.parametrize("case", CASES)
def test_gram_gradient_wudi_matches_reference_adam(golden, case):
    got = sj.wudi_gd(golden[f"{case}/tau"], gradient="gram")
    assert rel_err(got, golden[f"{case}/wudi_adam300"]) <= 5e-5


def test_stacked_layers_match_reference_in_one_vmapped_call(golden):
    import jax

    tau = np.stack([golden["a/tau"], golden["a/tau"] * 2.0, golden["a/tau"][::-1]])
    merged = jax.jit(jax.vmap(sj.swudi))(tau)
    for layer in range(3):
        assert rel_err(merged[layer], np.asarray(sj.swudi(tau[layer]))) <= 1e-6
    assert rel_err(merged[0], golden["a/swudi_t1300_r0.65"]) <= 5e-5
