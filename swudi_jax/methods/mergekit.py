"""mergekit's methods by mergekit's names, options and semantics: one MethodSpec each.

The maths are in :mod:`swudi_jax.methods.mergekit_family` (the task-arithmetic family,
linear, sce), :mod:`swudi_jax.methods.interpolation` (slerp, nuslerp, multislerp, karcher,
model_stock, nearswap) and :mod:`swudi_jax.methods.mergekit_selective` (ram, ramplus_tl,
arcee_fusion); this module only states, per method, what the merger needs: the option
names as mergekit spells them (``lambda`` is ``lam`` here, a Python keyword; configs accept
both), which options are per model (``weight``, ``density``, ``gamma``, ``epsilon``) and
which may vary per tensor, whether the method reads task vectors or the models' weights, how
it uses the base model, how many models it takes, and the dtypes it is defined in.

Differences from mergekit, all additive: a per-model ``weight`` left out is 1 (mergekit
requires it); the random sparsifiers (dare_*, della*) draw from ``seed`` (mergekit draws from
torch's global generator, which cannot be reproduced here); ``int8_mask`` is accepted and has
no effect (in mergekit it only stores the sign-consensus mask as int8 to save memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import compute_dtype, round_to
from swudi_jax.maths.validation import check_number
from swudi_jax.methods import interpolation as ip
from swudi_jax.methods import mergekit_family as mf
from swudi_jax.methods import mergekit_selective as msel
from swudi_jax.methods import sparsify as sp
from swudi_jax.methods.dare import leaf_key
from swudi_jax.methods.spec import COMPUTE_DTYPES, MethodSpec, typed_options

MERGEKIT = "mergekit 0.1.5 semantics (arcee-ai/mergekit, merge_methods/); "
ANY_DTYPE = COMPUTE_DTYPES
"""mergekit's methods compute in the merge's dtype, rounding per operation as its PyTorch code."""


def _need(value: Any, name: str, method: str) -> Any:
    if value is None:
        raise ValueError(f"method {method!r} needs the option {name!r} (mergekit has no default for it)")
    return value


def _family_inputs(family: mf.TaskArithmetic):
    """leaf_inputs of a task-arithmetic method: the tensor's own option values checked (per-model
    and per-tensor ones, which the spec's ``validate`` sees only one by one), then its
    sparsifier's input: the exact (N, 2) rank windows from the host values, or the PRNG key."""

    def inputs(options: Mapping[str, Any], path: str, layer: int, shape: tuple[int, ...]) -> dict[str, Any]:
        try:
            family.check(options)
        except ValueError as exc:
            raise ValueError(f"{path!r}: {exc}") from None
        if family.sparsification is None:
            return {}
        if family.sparsification in mf.RANDOM:
            return _keys(options, path, layer, shape)
        size = int(np.prod(shape)) if shape else 1
        return {"windows": sp.rank_windows(family.sparsification, options["density"], size, options.get("gamma", 0.0))}

    return inputs


def _keys(options: Mapping[str, Any], path: str, layer: int, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"key": leaf_key(int(options["seed"]), path, layer)}


# ----------------------------------------------------------------------------- on the models' weights


def linear(models, *, weight=1.0, normalize=True):
    """Σ wi θi (/ Σ wi): model soups."""
    return mf.linear(models, weight, normalize=normalize)


def slerp(models, base=None, *, t=None):
    """Spherical interpolation from the base (t = 0) to the one other model (t = 1)."""
    return ip.slerp(base, models[0], _need(t, "t", "slerp"))


def nuslerp(models, base=None, *, weight=1.0, nuslerp_row_wise=False, nuslerp_flatten=True, t=None):
    """slerp of two models (or their task vectors, with a base) at t = w2 / (w1 + w2)."""
    return ip.nuslerp(models, weight, base, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten, t=t)


def _nuslerp_t(options: Mapping[str, Any], path: str, layer: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """The tensor's t from its host weights in float64, as mergekit computes it in Python."""
    return {"t": ip.nuslerp_t(options["weight"])}


def multislerp(models, base=None, *, weight=1.0, normalize_weights=True, eps=1e-8):
    """Barycentric interpolation on the sphere of N models (or task vectors, with a base)."""
    return ip.multislerp(models, weight, base, normalize_weights=normalize_weights, eps=eps)


def karcher(models, *, max_iter=10, tol=1e-5):
    """The Karcher mean of the inputs' directions times their mean norm."""
    return ip.karcher(models, None, max_iter=max_iter, tol=tol)


def model_stock(models, base=None, *, filter_wise=False):
    """θ = t·mean(θi) + (1 − t)·θ0, t from the experts' mean pairwise task-vector cosine."""
    return ip.model_stock(base, models, filter_wise=filter_wise)


def nearswap(models, base=None, *, t=None):
    """The other model's value where it lies within t of the base's."""
    return ip.nearswap(base, models[0], _need(t, "t", "nearswap"))


def arcee_fusion(models, base=None, *, seed=0, key=None):
    """The base plus the other model's most important changes (importance = |Δ|·KL)."""
    return msel.arcee_fusion(base, models[0], key=key)


def ramplus_tl(models, base=None, *, r=0.1, alpha=0.2, epsilon=1e-5):
    """RAM+ on the task vectors (rounded to the merge dtype); θ0 + M rounded once, as mergekit."""
    tau = round_to(models.astype(compute_dtype(models.dtype)) - base.astype(compute_dtype(models.dtype)), models.dtype)
    return msel.ramplus_tl(tau.astype(models.dtype), r=r, alpha=alpha, epsilon=epsilon, base=base)


def passthrough(models, *, scale=1.0):
    """The one input model's tensor times ``scale``, a per-model option as in mergekit (whose
    default, none, leaves the tensor as it is: so does 1 here)."""
    return mf.passthrough(models[0], jnp.reshape(jnp.asarray(scale), (-1,))[0])


def _check_select(options: Mapping[str, Any]) -> None:
    check_number(options["select_topk"], "select_topk", low=0.0, high=1.0)


def _check_t(options: Mapping[str, Any]) -> None:
    if options["t"] is not None:
        check_number(options["t"], "t")


PER_MODEL = ("weight", "density", "gamma", "epsilon")
"""mergekit's per-model (tensor) parameters of the task-arithmetic family; ``lambda`` varies per tensor."""


def _task_arithmetic(family: mf.TaskArithmetic, source: str) -> MethodSpec:
    """A task-arithmetic method's spec: every fact of it read from ``family``."""
    return MethodSpec(family.name, family, "elementwise", source=MERGEKIT + source,
                      per_expert=tuple(k for k in PER_MODEL if k in family.defaults), tensor_options=("lam",),
                      leaf_inputs=_family_inputs(family), validate=family.check, inputs=family.inputs,
                      compute_dtypes=ANY_DTYPE, n_experts=(1, None), kept=family.kept,
                      combination=family.coefficients if family.sparsification is None and family.consensus is None
                      else None)


def _family(name, fn, source, *, tensor, validate=None):
    return typed_options(MethodSpec(name, fn, "elementwise", source=MERGEKIT + source, tensor_options=tensor,
                                    validate=validate, compute_dtypes=ANY_DTYPE, n_experts=(1, None)))


TA = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)"
TIES_SRC = "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)"
DARE_SRC = "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)"
BREAD = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv 2312.06795)"
DELLA_SRC = "Deep et al., DELLA-Merging (arXiv 2406.11617)"

TASK_ARITHMETIC = _task_arithmetic(mf.task_arithmetic, TA)
TIES = _task_arithmetic(mf.ties, TIES_SRC)
DARE_TIES = _task_arithmetic(mf.dare_ties, DARE_SRC + " with TIES sign election")
DARE_LINEAR = _task_arithmetic(mf.dare_linear, DARE_SRC)
BREADCRUMBS = _task_arithmetic(mf.breadcrumbs, BREAD)
BREADCRUMBS_TIES = _task_arithmetic(mf.breadcrumbs_ties, BREAD + " with TIES sign election")
DELLA = _task_arithmetic(mf.della, DELLA_SRC)
DELLA_LINEAR = _task_arithmetic(mf.della_linear, DELLA_SRC + " without sign election")
SCE = _family("sce", mf.sce, "Wan et al., FuseChat (SCE), arXiv 2408.07990", tensor=("select_topk",),
              validate=_check_select)
RAM = _family("ram", msel.ram, "Reinforced Agent Merging", tensor=("epsilon",))


def _on_models(name, fn, source, *, base, n_experts, per_expert=(), tensor=(), validate=None, leaf=None,
               inputs=("base",)):
    return typed_options(MethodSpec(name, fn, "elementwise", source=MERGEKIT + source, operand="models", base=base,
                                    n_experts=n_experts, per_expert=per_expert, tensor_options=tensor,
                                    validate=validate, leaf_inputs=leaf, inputs=inputs, compute_dtypes=ANY_DTYPE))


LINEAR = dataclasses.replace(
    _on_models("linear", linear, "Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)", base="joins",
               n_experts=(1, None), per_expert=("weight",), inputs=()),
    combination=mf.linear_coefficients)
SLERP = _on_models("slerp", slerp, "spherical linear interpolation (Shoemake 1985)", base="required",
                   n_experts=(1, 1), tensor=("t",), validate=_check_t)
NUSLERP = _on_models("nuslerp", nuslerp, "slerp at t = w2/(w1 + w2), of task vectors when a base is given",
                     base="optional", n_experts=(2, 2), per_expert=("weight",), leaf=_nuslerp_t, inputs=("base", "t"))
MULTISLERP = _on_models("multislerp", multislerp, "barycentric slerp of N models (Goddard 2024)", base="optional",
                        n_experts=(1, None), per_expert=("weight",))
KARCHER = _on_models("karcher", karcher, "the Karcher (Riemannian) mean on the sphere", base="joins",
                     n_experts=(1, None), inputs=())
MODEL_STOCK = _on_models("model_stock", model_stock, "Jang et al., Model Stock, ECCV 2024 (arXiv 2403.19522)",
                         base="required", n_experts=(2, None))
NEARSWAP = _on_models("nearswap", nearswap, "take the other model's value where it is near the base's",
                      base="required", n_experts=(1, 1), tensor=("t",), validate=_check_t)
RAMPLUS_TL = _on_models("ramplus_tl", ramplus_tl, "Reinforced Agent Merging+ (tensor-local)", base="required",
                        n_experts=(1, None), tensor=("r", "alpha", "epsilon"))
ARCEE_FUSION = _on_models("arcee_fusion", arcee_fusion, "Arcee Fusion (importance = |Δ|·KL, IQR threshold)",
                          base="required", n_experts=(1, 1), leaf=_keys, inputs=("base", "key"))
PASSTHROUGH = _on_models("passthrough", passthrough, "the one input model's tensor, unchanged", base="unused",
                         n_experts=(1, 1), per_expert=("scale",), inputs=())

MERGEKIT_METHODS: tuple[MethodSpec, ...] = (
    LINEAR, TASK_ARITHMETIC, TIES, DARE_TIES, DARE_LINEAR, BREADCRUMBS, BREADCRUMBS_TIES, DELLA, DELLA_LINEAR,
    SCE, RAM, RAMPLUS_TL, SLERP, NUSLERP, MULTISLERP, KARCHER, MODEL_STOCK, NEARSWAP, ARCEE_FUSION, PASSTHROUGH,
)
"""Every mergekit method here, by mergekit's name."""

__all__ = ["MERGEKIT_METHODS", "PER_MODEL"] + [s.name.upper() for s in MERGEKIT_METHODS]
