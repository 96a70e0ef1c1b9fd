"""SWUDI-A's full family of per-layer rank rules and in-subspace filters (the authors' set).

Source: the SWUDI authors' reference code (MLLMerging, ``yongxianwei_merging``, ASWUDI's
``auto_rank_method``, ``rank_scale``, ``filter_type`` and Wiener options); the formulas below
are restated from its documentation and checked against its outputs
(tests/test_golden_family.py). Everything works on the **ascending**, clamped (≥ 1e-8)
eigenvalues λ of C as ``jnp.linalg.eigh`` returns them; "descending" below means λ₁ ≥ λ₂ ≥ …
K is a traced int32 scalar, so every rule runs under ``jit`` and ``vmap``.

Spectrum rules (λ only; y = √λ, p a normalised mass):

- ``entropy_sq``: K = ⌈exp(−Σ p log p)⌉, p = λ² / Σλ²
- ``cumvar_<f>``: the smallest K with Σ_{k≤K} λ_k / Σλ ≥ f (descending)
- ``none``: K = n
- ``participation_sqrt_c2``: K₀ = ⌈(Σy)²/Σy²⌉, ĉ² = var(y_{1..K₀}) / mean(y_{1..K₀})² (population
  variance, 0 when K₀ < 2), K = ⌈(1 + ĉ²) K₀⌉; ``participation_sqrt_c2_half``: ⌈(1 + ĉ²/2) K₀⌉
- ``participation_sqrt_plus``: K = ⌈(Σy)²/Σy² · (1 + 1/log(n + 2.71828))⌉

D-aware rules (need e_k = ‖(D V)_k‖² / λ_k², the energy of θ* = D C⁺ per direction, descending λ):

- ``d_aware_participation_sqrt``: K = ⌈(Σ√e)² / Σe⌉
- ``d_aware_cumvar``: the smallest K with Σ_{k≤K} e_k / Σe ≥ 0.99
- ``d_aware_entropy``: K = ⌈exp(−Σ p log p)⌉, p = e / Σe

WUDI-loss rules (with r_k = ‖(D V)_k‖², a_k = ‖(θ0 V)_k‖², descending λ; the reference's
per-direction fit term ℓ_k = λ_k² a_k + r_k, which omits the cross term −2λ_k⟨(θ0V)_k, (DV)_k⟩):

    L_fit(K) = Σ_{k>K} ℓ_k,   L_norm(K) = Σ_{k≤K} r_k/λ_k² + Σ_{k>K} a_k,   K = 0 … n

- ``loss_elbow`` / ``loss_elbow_<f>`` (f = 0.01 by default): the first K with L_fit(K)/L_fit(0) ≤ f
- ``loss_residual_<f>``: the first K with L_fit(K)/L_fit(0) ≤ 1 − f
- ``wudi_risk`` / ``wudi_risk_<ρ>`` (ρ = 1 by default): K = argmin_K L_fit(K) + ρ L_norm(K)

Every K is clamped to [min_rank, max(min_rank, round(max_rank_ratio·n))] (and ≤ n), then, when
``rank_scale`` ≠ 1, K ← clip(round(K · rank_scale), min_rank, n) (round half to even).

In-subspace filters on the kept top K (h = 0 elsewhere): "none" h = 1; "exponential"
h = 1 − e^{−λt}; "wiener" h = λ^p / (λ^p + α ν̂²) with ν̂² = max(floor, 1e-8), floor the mean
("tail_mean"), largest ("tail_first") or lower median ("tail_median") of the n − K discarded
eigenvalues, or the lower median of all of them when K = n.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from swudi_jax.maths import filters
from swudi_jax.maths.validation import check_choice, check_number

SPECTRUM_RULES = (
    "entropy_sq", "none", "participation_sqrt_c2", "participation_sqrt_c2_half", "participation_sqrt_plus",
)
D_AWARE_RULES = ("d_aware_participation_sqrt", "d_aware_cumvar", "d_aware_entropy")
LOSS_RULES = ("loss_elbow", "wudi_risk")
PREFIX_RULES = ("cumvar_", "loss_elbow_", "loss_residual_", "wudi_risk_")
"""Rules that take a number after the prefix, e.g. ``cumvar_0.95``, ``wudi_risk_0.5``."""
FAMILY_FILTERS = ("none", "exponential", "wiener")
WIENER_FLOORS = ("tail_mean", "tail_first", "tail_median")
TINY = 1e-30


class RuleSpec(NamedTuple):
    """A parsed rank rule: its ``kind`` ("builtin", "spectrum", "d_aware", "loss"), base name
    and numeric parameter (None where it takes none)."""

    kind: str
    name: str
    value: float | None


def parse_rank_rule(rank_rule: str) -> RuleSpec:
    """Parse and check a rank-rule name; a ValueError names ``rank_rule`` and the known names."""
    if not isinstance(rank_rule, str):
        raise ValueError(f"rank_rule must be a string, got {rank_rule!r}")  # noqa: TRY004 (the package refuses bad input with ValueError)
    if rank_rule in filters.RANK_RULES:
        return RuleSpec("builtin", rank_rule, None)
    if rank_rule in SPECTRUM_RULES:
        return RuleSpec("spectrum", rank_rule, None)
    if rank_rule in D_AWARE_RULES:
        return RuleSpec("d_aware", rank_rule, None)
    if rank_rule == "loss_elbow":
        return RuleSpec("loss", "loss_elbow", 0.01)
    if rank_rule == "wudi_risk":
        return RuleSpec("loss", "wudi_risk", 1.0)
    for prefix in PREFIX_RULES:
        if rank_rule.startswith(prefix):
            text = rank_rule[len(prefix):]
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            base = prefix[:-1]
            if base == "wudi_risk":
                ok = math.isfinite(value) and value > 0
                want = "a number > 0"
            else:
                ok = math.isfinite(value) and 0 < value <= 1
                want = "a fraction in (0, 1]"
            if not ok:
                raise ValueError(f"rank_rule {rank_rule!r}: the part after {prefix!r} must be {want}, got {text!r}")
            return RuleSpec("spectrum" if base == "cumvar" else "loss", base, value)
    known = sorted([*filters.RANK_RULES, *SPECTRUM_RULES, *D_AWARE_RULES, *LOSS_RULES]) + [p + "<x>" for p in PREFIX_RULES]
    raise ValueError(f"unknown rank_rule {rank_rule!r}; choose one of {known}")


def needs_projections(rank_rule: str) -> bool:
    """True for the rules that read ‖(DV)_k‖² (and ‖(θ0V)_k‖²), not only λ."""
    return parse_rank_rule(rank_rule).kind in ("d_aware", "loss")


# ------------------------------------------------------------------------ spectrum rules


def _ceil(x):
    return jnp.ceil(x).astype(jnp.int32)


def _participation_sqrt_raw(desc):
    y = jnp.sqrt(desc)
    return jnp.sum(y) ** 2 / jnp.maximum(jnp.sum(y * y), TINY), y


def _c2_rank(desc, weight):
    raw, y = _participation_sqrt_raw(desc)
    k0 = _ceil(raw)
    mask = (jnp.arange(desc.shape[-1]) < k0).astype(desc.dtype)
    count = jnp.maximum(k0, 1).astype(desc.dtype)
    mu = jnp.sum(y * mask) / count
    var = jnp.sum(((y - mu) * mask) ** 2) / count
    c_sq = jnp.where(k0 >= 2, jnp.maximum(var / jnp.maximum(mu * mu, TINY), 0.0), 0.0)
    return _ceil((1.0 + weight * c_sq) * k0)


def spectrum_rank(spec: RuleSpec, lam: jnp.ndarray) -> jnp.ndarray:
    """The unclamped K of a spectrum rule from ascending λ (see the module docstring)."""
    n = lam.shape[-1]
    desc = lam[::-1]
    if spec.name == "none":
        return jnp.asarray(n, jnp.int32)
    if spec.name == "entropy_sq":
        sq = desc * desc
        p = jnp.maximum(sq / jnp.maximum(jnp.sum(sq), TINY), TINY)
        return _ceil(jnp.exp(-jnp.sum(p * jnp.log(p))))
    if spec.name == "cumvar":
        share = jnp.cumsum(desc) / jnp.maximum(jnp.sum(desc), TINY)
        return (jnp.sum(share < spec.value) + 1).astype(jnp.int32)
    if spec.name == "participation_sqrt_c2":
        return _c2_rank(desc, 1.0)
    if spec.name == "participation_sqrt_c2_half":
        return _c2_rank(desc, 0.5)
    if spec.name == "participation_sqrt_plus":
        # the reference evaluates log(n + 2.71828) in float32
        correction = 1.0 + 1.0 / float(np.log(np.float32(n + 2.71828)))
        return _ceil(_participation_sqrt_raw(desc)[0] * correction)
    raise ValueError(f"{spec.name!r} is not a spectrum rank rule")


def d_aware_rank(spec: RuleSpec, lam: jnp.ndarray, rhs_energy: jnp.ndarray) -> jnp.ndarray:
    """The unclamped K of a D-aware rule; ``rhs_energy`` = ‖(DV)_k‖² in λ's (ascending) order."""
    e = jnp.maximum((rhs_energy / (lam * lam))[::-1], 0.0)
    total = jnp.maximum(jnp.sum(e), TINY)
    if spec.name == "d_aware_participation_sqrt":
        y = jnp.sqrt(jnp.maximum(e, TINY))
        return _ceil(jnp.sum(y) ** 2 / jnp.maximum(jnp.sum(y * y), TINY))
    if spec.name == "d_aware_cumvar":
        return (jnp.sum(jnp.cumsum(e) / total < 0.99) + 1).astype(jnp.int32)
    if spec.name == "d_aware_entropy":
        p = jnp.maximum(e / total, TINY)
        return _ceil(jnp.exp(-jnp.sum(p * jnp.log(p))))
    raise ValueError(f"{spec.name!r} is not a D-aware rank rule")


def loss_curves(lam: jnp.ndarray, rhs_energy: jnp.ndarray, anchor_energy: jnp.ndarray):
    """(L_fit, L_norm) for K = 0 … n (length n + 1) from ascending λ, ‖(DV)_k‖², ‖(θ0V)_k‖²."""
    lam_d, r, a = lam[::-1], jnp.maximum(rhs_energy[::-1], 0.0), jnp.maximum(anchor_energy[::-1], 0.0)
    ell = lam_d * lam_d * a + r
    cum_fit = jnp.cumsum(ell)
    total = jnp.maximum(cum_fit[-1], TINY)
    l_fit = jnp.concatenate([total[None], total - cum_fit])
    zero = jnp.zeros((1,), lam.dtype)
    cum_in = jnp.concatenate([zero, jnp.cumsum(r / jnp.maximum(lam_d * lam_d, TINY))])
    cum_out = jnp.concatenate([zero, jnp.cumsum(a)])
    return l_fit, cum_in + (cum_out[-1] - cum_out)


def loss_rank(spec: RuleSpec, lam, rhs_energy, anchor_energy) -> jnp.ndarray:
    """The unclamped K of a WUDI-loss rule (see the module docstring)."""
    n = lam.shape[-1]
    l_fit, l_norm = loss_curves(lam, rhs_energy, anchor_energy)
    if spec.name == "wudi_risk":
        return jnp.argmin(l_fit + spec.value * l_norm).astype(jnp.int32)
    threshold = spec.value if spec.name == "loss_elbow" else 1.0 - spec.value
    below = l_fit / jnp.maximum(l_fit[0], TINY) <= threshold
    return jnp.where(jnp.any(below), jnp.argmax(below), n).astype(jnp.int32)


def family_rank(
    lam: jnp.ndarray,
    shape: tuple[int, int],
    rank_rule: str,
    *,
    min_rank: int = 1,
    max_rank_ratio: float = 1.0,
    rank_scale: float = 1.0,
    rhs_energy: jnp.ndarray | None = None,
    anchor_energy: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """SWUDI-A's K for any rule of the family, clamped and scaled as the reference does.

    Args:
      lam: ascending clamped eigenvalues of C, length n.
      shape: the layer's (m, n) (Gavish–Donoho reads the aspect ratio).
      rank_rule: any rule name accepted by :func:`parse_rank_rule`.
      min_rank, max_rank_ratio: K ∈ [min_rank, max(min_rank, round(max_rank_ratio·n))].
      rank_scale: K ← clip(round(K·rank_scale), min_rank, n) when ≠ 1.
      rhs_energy, anchor_energy: ‖(DV)_k‖² and ‖(θ0V)_k‖² per direction (λ's order), for
        the D-aware and loss rules.
    Returns:
      K as an int32 scalar.
    """
    spec = parse_rank_rule(rank_rule)
    n = lam.shape[-1]
    if spec.kind in ("d_aware", "loss") and rhs_energy is None:
        raise ValueError(f"rank_rule {rank_rule!r} needs rhs_energy (and anchor_energy for the loss rules)")
    if spec.kind == "builtin":
        raw = filters.RANK_RULES[spec.name](lam, shape)
    elif spec.kind == "spectrum":
        raw = spectrum_rank(spec, lam)
    elif spec.kind == "d_aware":
        raw = d_aware_rank(spec, lam, rhs_energy)
    else:
        anchor_energy = jnp.zeros_like(rhs_energy) if anchor_energy is None else anchor_energy
        raw = loss_rank(spec, lam, rhs_energy, anchor_energy)
    upper = min(n, max(min_rank, round(max_rank_ratio * n)))
    k = jnp.clip(raw, min_rank, upper).astype(jnp.int32)
    if abs(rank_scale - 1.0) > 1e-8:
        scaled = jnp.round(k.astype(lam.dtype) * rank_scale).astype(jnp.int32)
        k = jnp.clip(scaled, min_rank, n).astype(jnp.int32)
    return k


# ------------------------------------------------------------------- in-subspace filters


def _lower_median_of_prefix(lam: jnp.ndarray, count: jnp.ndarray) -> jnp.ndarray:
    """Lower median of the ``count`` smallest entries of ascending ``lam`` (count ≥ 1)."""
    return lam[jnp.maximum(count - 1, 0) // 2]


def wiener_noise(lam: jnp.ndarray, k: jnp.ndarray, floor: str) -> jnp.ndarray:
    """ν̂² before the 1e-8 floor and scale: a statistic of the n − K discarded eigenvalues
    (ascending ``lam``), or the lower median of all n when K = n."""
    n = lam.shape[-1]
    tail = n - k
    idx = jnp.arange(n)
    if floor == "tail_mean":
        value = jnp.sum(jnp.where(idx < tail, lam, 0.0)) / jnp.maximum(tail, 1).astype(lam.dtype)
    elif floor == "tail_first":
        value = lam[jnp.maximum(tail - 1, 0)]
    elif floor == "tail_median":
        value = _lower_median_of_prefix(lam, tail)
    else:
        raise ValueError(f"wiener_floor must be one of {list(WIENER_FLOORS)}, got {floor!r}")
    return jnp.where(tail > 0, value, _lower_median_of_prefix(lam, jnp.asarray(n)))


def subspace_filter(lam: jnp.ndarray, k: jnp.ndarray, filter: str = "none", *, time: float = 1e6,
                    wiener_scale: float = 1.0, wiener_power: float = 2.0,
                    wiener_floor: str = "tail_mean") -> jnp.ndarray:
    """h on the top K of ascending ``lam`` (0 elsewhere): "none" 1, "exponential"
    1 − e^{−λt}, "wiener" λ^p / (λ^p + α·max(ν̂², 1e-8)) (see :func:`wiener_noise`)."""
    n = lam.shape[-1]
    kept = jnp.arange(n) >= n - k
    if filter == "none":
        h = jnp.ones_like(lam)
    elif filter == "exponential":
        h = jnp.clip(-jnp.expm1(-lam * time), 0.0, 1.0)
    elif filter == "wiener":
        nu = jnp.maximum(wiener_noise(lam, k, wiener_floor), filters.EIG_FLOOR) * wiener_scale
        lam_p = lam**wiener_power
        h = lam_p / (lam_p + nu)
    else:
        raise ValueError(f"filter must be one of {list(FAMILY_FILTERS)}, got {filter!r}")
    return jnp.where(kept, h, 0.0).astype(lam.dtype)


def check_subspace_filter_options(filter: str, time: float, wiener_scale: float, wiener_power: float,
                                  wiener_floor: str) -> None:
    """ValueError naming the option for a bad SWUDI-A filter setting."""
    check_choice(filter, "filter", FAMILY_FILTERS)
    check_number(time, "time", low=0.0)
    check_number(wiener_scale, "wiener_scale", low=0.0)
    check_number(wiener_power, "wiener_power", low=0.0, low_open=True)
    check_choice(wiener_floor, "wiener_floor", WIENER_FLOORS)


__all__ = [
    "D_AWARE_RULES",
    "FAMILY_FILTERS",
    "LOSS_RULES",
    "PREFIX_RULES",
    "SPECTRUM_RULES",
    "WIENER_FLOORS",
    "RuleSpec",
    "check_subspace_filter_options",
    "d_aware_rank",
    "family_rank",
    "loss_curves",
    "loss_rank",
    "needs_projections",
    "parse_rank_rule",
    "spectrum_rank",
    "subspace_filter",
    "wiener_noise",
]
