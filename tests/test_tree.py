"""Whole-model merging: the golden model, both layouts, grouping, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swudi_jax as sj
from swudi_jax.tree import merge_group, plan_tree
from swudi_jax.layout import group_plans

NAMES = ["embed.weight", "blocks.0.attn.weight", "blocks.0.attn.bias", "blocks.0.mlp.weight",
         "blocks.0.norm.weight", "lm_head.weight"]


def rel_err(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def golden_model(golden):
    base = {n: golden[f"model/base/{n}"] for n in NAMES}
    experts = [{n: golden[f"model/expert{i}/{n}"] for n in NAMES} for i in range(4)]
    want = {n: golden[f"model/swudi_t1300_r0.65/{n}"] for n in NAMES}
    return base, experts, want


def test_torch_layout_model_matches_reference_implementation(golden_model):
    base, experts, want = golden_model
    merged = sj.merge(base, experts, method="swudi", layout="torch")
    assert set(merged) == set(NAMES)
    for name in NAMES:
        assert merged[name].dtype == np.float32 and merged[name].shape == want[name].shape
        assert rel_err(merged[name], want[name]) <= 5e-5, name
