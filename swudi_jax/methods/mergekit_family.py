"""mergekit's task-vector methods by mergekit's names and semantics (layer level, in JAX).

Semantics as mergekit 0.1.5 computes them (``merge_methods/generalized_task_arithmetic.py``,
``linear.py``, ``sce.py``, ``passthrough.py``, ``sparsify.py``; read, not copied), each from
its paper. One code path, :func:`generalized_task_arithmetic`, serves the whole family:

    δi = sparsify(τi; di, γi, εi, rescale)          (none for task_arithmetic)
    δi ← wi·δi                                      (per-model weight, rounded to the dtype)
    consensus:    M = Σi mi δi,  Z = Σi mi wi (0 → 1),  mi = [sign δi = γ]   (TIES elect)
    no consensus: M = Σi δi,     Z = Σi wi (|Z| < 1e-8 → 1)
    M ← M / Z if normalize;   M ← λ·M;   merged weight θ = θ0 + M

========================  ==================  =========  ==========  =======  ============
method                    sparsifier          consensus  normalize   rescale  extra
========================  ==================  =========  ==========  =======  ============
task_arithmetic           —                   —          False       —        —
ties                      magnitude           sum        True        False    —
dare_ties                 random              sum        False       True     key
dare_linear               random              —          False       True     key
breadcrumbs               magnitude_outliers  —          False       False    gamma = 0.01
breadcrumbs_ties          magnitude_outliers  sum        False       False    gamma = 0.01
della                     della_magprune      sum        True        True     epsilon = 0.15, key
della_linear              della_magprune      —          False       True     epsilon = 0.15, key
========================  ==================  =========  ==========  =======  ============

Shared defaults: ``weight`` is required per model (mergekit has no default), ``density`` = 1
(no sparsification), ``lambda`` = 1, ``int8_mask`` = False (it only changes the storage
dtype of mergekit's mask: no numerical effect, so it is not an argument here). ``rescale:
true`` is the L1-norm rescale of mergekit 0.1.5 (see :mod:`swudi_jax.methods.sparsify`).
A base model is required; a base listed among the models is the base, not an expert.

dtypes: these functions compute in the task vectors' dtype, as mergekit computes in the
merge's ``dtype`` (or the inputs' promoted dtype): bf16/float16 inputs give bf16/float16
arithmetic with one rounding per PyTorch operation (each done in float32 and rounded, made
explicit with ``lax.reduce_precision`` because XLA may keep excess precision; sums
accumulate in float32 and round once). As mergekit's CPU path: magnitudes are ranked in
float32; a bf16 tensor's random keep probabilities (d, and DELLA's rank formula) are built
in bf16, a float16 tensor's in float32, and float16 random sparsifiers rescale in float32.
Equal magnitudes at a cut are kept as mergekit's CPU sort keeps them
(:mod:`swudi_jax.methods.sort_order`), so this is bit-exact against mergekit 0.1.5 (see
``benchmarks/mergekit_crosscheck``). :func:`linear` accumulates model by model in float32
(float64 for float64 inputs) and casts back, as mergekit.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.methods import consensus as _consensus
from swudi_jax.methods import sparsify as _sparsify
from swudi_jax.maths.linalg import compute_dtype, divide, is_floating, sum_leading
from swudi_jax.maths.validation import check_number, is_concrete

SUM_EPS = 1e-8


# ----------------------------------------------------------------------------- the family


@partial(jax.jit, static_argnames=("consensus", "normalize"))
def _combine(delta, weight, lam, *, consensus, normalize):
    """Weights, consensus, normalisation, λ: in the work dtype, rounded per operation to delta's dtype."""
    rnd = _sparsify.rounder(delta.dtype)
    work = compute_dtype(delta.dtype)
    w = rnd(weight.astype(work))
    # δi = wi·τi, rounded to delta's dtype, is held in it (bf16: half the bytes of float32)
    d = rnd(delta.astype(work) * w.reshape((-1,) + (1,) * (delta.ndim - 1))).astype(delta.dtype)
    if consensus is not None:
        merged, divisor = _consensus.disjoint_merge(d, w, consensus, rnd)
    else:
        merged = rnd(sum_leading(d, work))
        total = rnd(jnp.sum(w))
        divisor = jnp.where(jnp.abs(total) < SUM_EPS, 1, total)
    if normalize:
        merged = rnd(divide(merged, divisor))
    return rnd(merged * jnp.asarray(lam, work)).astype(delta.dtype)


def generalized_task_arithmetic(
    tau: jax.Array,
    weight: Any,
    *,
    density: Any = 1.0,
    sparsification: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool | str | None = False,
    lam: Any = 1.0,
    gamma: Any = 0.0,
    epsilon: Any = 0.0,
    key: jax.Array | None = None,
    uniforms: Any = None,
    windows: Any = None,
) -> jax.Array:
    """mergekit's generalised task arithmetic of one tensor: the merged task vector M.

    Args:
      tau: task vectors τi = θi − θ0, (N, ...), in the compute dtype.
      weight: wi, scalar or (N,) (array values may be traced: per-tensor values under vmap).
      density, gamma, epsilon: the sparsifier's per-model parameters, scalar or (N,).
      sparsification: None or one of :data:`swudi_jax.methods.sparsify.SPARSIFIERS`.
      consensus: None, "sum" (TIES) or "count".
      normalize: divide by the (agreeing) weights' sum.
      rescale: True ("l1"), False, or a norm name (see :mod:`swudi_jax.methods.sparsify`).
      lam: λ, the final scale (a scalar, may be traced).
      key / uniforms: randomness of the random sparsifiers. windows: exact rank windows.
    Returns:
      M (...,) in ``tau``'s dtype; the merged weight is ``θ0 + M``.
    """
    if tau.ndim < 1 or tau.shape[0] < 1:
        raise ValueError(f"tau must stack at least one task vector on axis 0, got shape {tau.shape}")
    if not is_floating(tau.dtype):
        raise ValueError(f"tau must have a floating dtype, got {tau.dtype}")
    if consensus is not None and consensus not in _consensus.CONSENSUS:
        raise ValueError(f"consensus must be None or one of {list(_consensus.CONSENSUS)}, got {consensus!r}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be true or false, got {normalize!r}")
    n = tau.shape[0]
    weight = _sparsify.per_model(weight, n, "weight")
    if isinstance(weight, np.ndarray) and not np.all(np.isfinite(weight)):
        raise ValueError(f"weight must be finite, got {weight.tolist()}")
    if is_concrete(lam) and not np.isfinite(float(np.asarray(lam))):
        raise ValueError(f"lambda must be finite, got {lam!r}")
    if sparsification is not None:
        tau = _sparsify.sparsify(
            tau, sparsification, density, gamma=gamma, epsilon=epsilon, rescale=rescale,
            key=key, uniforms=uniforms, windows=windows,
        )
    return _combine(tau, jnp.asarray(weight, jnp.float32), lam, consensus=consensus, normalize=bool(normalize))


RANDOM = ("random", "della_magprune")
"""The sparsifiers that draw (a PRNG key per tensor); the others rank magnitudes (exact windows)."""
SPARSIFIER_OPTIONS: dict[str, dict[str, float]] = {"magnitude_outliers": {"gamma": 0.01}, "della_magprune": {"epsilon": 0.15}}
"""A sparsifier's own per-model option and mergekit's default for it."""
IGNORED = ("int8_mask", "seed")
"""Options the layer takes and does not read: ``int8_mask`` (mergekit's mask storage dtype) and
``seed`` (the merger turns it into each tensor's ``key``)."""


def _numbers(value: Any, name: str, low: float | None = None, high: float | None = None) -> np.ndarray | None:
    """A scalar or per-model option as finite host values in [low, high]; None when traced."""
    if not is_concrete(value):
        return None
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = np.asarray(None)
    if not jnp.issubdtype(arr.dtype, jnp.number) or arr.ndim > 1:
        raise ValueError(f"{name} must be a number or a list of one number per model, got {value!r}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if (low is not None and np.any(arr < low)) or (high is not None and np.any(arr > high)):
        bounds = f"lie in [{low}, {high}]" if high is not None else f"be >= {low}"
        raise ValueError(f"{name} must {bounds}, got {value!r}")
    return arr


def _flag(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_epsilon(density: np.ndarray | None, epsilon: np.ndarray | None) -> None:
    """DELLA's rule (mergekit's ``della_magprune``): where 0 < d < 1, d ± ε lies in (0, 1)."""
    if density is None or epsilon is None:
        return
    try:
        d, e = np.broadcast_arrays(density, epsilon)
    except ValueError:
        raise ValueError(f"density and epsilon must give one value per model each, got {density.tolist()} and "
                         f"{epsilon.tolist()}") from None
    _sparsify.check_sparsify_params("della_magprune", np.atleast_1d(d), 0.0, np.atleast_1d(e))


@dataclass(frozen=True)
class TaskArithmetic:
    """One method of mergekit's generalized task arithmetic, as mergekit builds eight methods
    from one class: a sparsifier, a sign consensus and the defaults of ``normalize`` and
    ``rescale`` (the table in the module docstring). An instance is the method's layer function

        fn(tau, *, weight=1, [density=1, gamma | epsilon,] normalize, [rescale,] lam=1,
           [int8_mask=False, seed=0,] [windows | key, uniforms]) → M

    whose keyword-only parameters (``__signature__``) are the method's options with
    mergekit's defaults (:attr:`defaults`, the one place they are written) followed by its
    per-leaf inputs (:attr:`inputs`). Every option is range-checked (:meth:`check`) before
    :func:`generalized_task_arithmetic` computes M; traced values (per-tensor values under the
    merger's ``vmap``) were checked where they entered.

    Attributes:
      name: mergekit's name of the method.
      sparsification: None or one of :data:`swudi_jax.methods.sparsify.SPARSIFIERS`.
      consensus: None or "sum" (TIES's sign election).
      normalize, rescale: mergekit's defaults of those options (rescale only with a sparsifier).
    """

    name: str
    sparsification: str | None
    consensus: str | None
    normalize: bool
    rescale: bool = False

    def __post_init__(self):
        kw = inspect.Parameter.KEYWORD_ONLY
        params = [inspect.Parameter("tau", inspect.Parameter.POSITIONAL_ONLY)]
        params += [inspect.Parameter(k, kw, default=v) for k, v in self.defaults.items()]
        params += [inspect.Parameter(k, kw, default=None) for k in self.inputs]
        object.__setattr__(self, "__signature__", inspect.Signature(params))

    @property
    def defaults(self) -> dict[str, Any]:
        """The options with mergekit's defaults (``weight`` is 1 where mergekit requires it)."""
        sparse = self.sparsification is not None
        options: dict[str, Any] = {"weight": 1.0, **({"density": 1.0} if sparse else {})}
        options.update(SPARSIFIER_OPTIONS.get(self.sparsification, {}))
        options.update({"normalize": self.normalize, **({"rescale": self.rescale} if sparse else {}), "lam": 1.0})
        if sparse:
            options.update({"int8_mask": False, **({"seed": 0} if self.sparsification in RANDOM else {})})
        return options

    @property
    def inputs(self) -> tuple[str, ...]:
        """Per-leaf inputs: exact rank ``windows`` (ranked sparsifiers) or a PRNG ``key`` (random
        ones; or the ``uniforms`` themselves)."""
        if self.sparsification is None:
            return ()
        return ("key", "uniforms") if self.sparsification in RANDOM else ("windows",)

    def check(self, options: Mapping[str, Any]) -> None:
        """ValueError naming the option for a value outside mergekit's range: weight and λ
        finite, density and gamma in [0, 1], DELLA's d ± ε in (0, 1), seed an integer >= 0."""
        _numbers(options["weight"], "weight")
        _numbers(options["lam"], "lambda")
        _flag(options["normalize"], "normalize")
        if self.sparsification is None:
            return
        _flag(options["int8_mask"], "int8_mask")
        if _sparsify.check_rescale(options["rescale"]) == "keep_prob" and self.sparsification not in RANDOM:
            raise ValueError(f"rescale='keep_prob' applies to the random sparsifiers, not {self.name!r}")
        density = _numbers(options["density"], "density", 0.0, 1.0)
        if "gamma" in options:
            _numbers(options["gamma"], "gamma", 0.0, 1.0)
        if "epsilon" in options:
            _check_epsilon(density, _numbers(options["epsilon"], "epsilon", 0.0))
        if "seed" in options:
            check_number(options["seed"], "seed", low=0, integer=True)

    def coefficients(self, options: Mapping[str, Any], n: int) -> np.ndarray:
        """c (N,) with M = Σ ci τi, for the members without sparsifier and consensus (plain
        task arithmetic): ci = λ wi, divided by Σ wj with ``normalize`` (by 1 when |Σ wj| < 1e-8)."""
        if self.sparsification is not None or self.consensus is not None:
            raise ValueError(f"{self.name}: its merged task vector is not a fixed combination of the task vectors")
        weight = _sparsify.per_model(options["weight"], n, "weight")
        total = float(np.sum(weight))
        divisor = (1.0 if abs(total) < SUM_EPS else total) if options["normalize"] else 1.0
        return np.asarray(weight, np.float64) * float(options["lam"]) / divisor

    def _options(self, tau: jax.Array, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        bound = self.__signature__.bind(tau, **kwargs)
        bound.apply_defaults()
        options = {k: v for k, v in bound.arguments.items() if k != "tau"}
        self.check(options)
        return options

    def __call__(self, tau: jax.Array, **kwargs: Any) -> jax.Array:
        options = self._options(tau, kwargs)
        weight = options.pop("weight")
        return generalized_task_arithmetic(
            tau, weight, sparsification=self.sparsification, consensus=self.consensus,
            **{k: v for k, v in options.items() if k not in IGNORED})

    def kept(self, tau: jax.Array, **kwargs: Any) -> jax.Array:
        """δi = wi · sparsify(τi) (N, ...), what the sign consensus and the sum see (same
        arguments as the method; τ itself, weighted, for task_arithmetic)."""
        options = self._options(tau, kwargs)
        if self.sparsification is not None:
            tau = _sparsify.sparsify(
                tau, self.sparsification, options["density"], gamma=options.get("gamma", 0.0),
                epsilon=options.get("epsilon", 0.0), rescale=options["rescale"],
                **{k: options[k] for k in self.inputs})
        weight = jnp.asarray(_sparsify.per_model(options["weight"], tau.shape[0], "weight"), tau.dtype)
        return tau * weight.reshape((-1,) + (1,) * (tau.ndim - 1))


task_arithmetic = TaskArithmetic("task_arithmetic", None, None, normalize=False)
ties = TaskArithmetic("ties", "magnitude", "sum", normalize=True, rescale=False)
dare_ties = TaskArithmetic("dare_ties", "random", "sum", normalize=False, rescale=True)
dare_linear = TaskArithmetic("dare_linear", "random", None, normalize=False, rescale=True)
breadcrumbs = TaskArithmetic("breadcrumbs", "magnitude_outliers", None, normalize=False, rescale=False)
breadcrumbs_ties = TaskArithmetic("breadcrumbs_ties", "magnitude_outliers", "sum", normalize=False, rescale=False)
della = TaskArithmetic("della", "della_magprune", "sum", normalize=True, rescale=True)
della_linear = TaskArithmetic("della_linear", "della_magprune", None, normalize=False, rescale=True)
FAMILY: tuple[TaskArithmetic, ...] = (
    task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear)
"""The family, by mergekit's names (the table in the module docstring)."""


# ----------------------------------------------------------------------------- others


@partial(jax.jit, static_argnames=("normalize",))
def _linear(models, weight, *, normalize):
    work = compute_dtype(models.dtype)
    w = weight.astype(work)
    out = jnp.zeros(models.shape[1:], work)
    for i in range(models.shape[0]):  # mergekit accumulates model by model, in float32
        out = out + models[i].astype(work) * w[i]
    if normalize:
        out = divide(out, jnp.sum(w))
    return out.astype(models.dtype)


def linear_coefficients(options: Mapping[str, Any], n: int) -> np.ndarray:
    """c (N,) with the merged weight Σ ci θi of :func:`linear`: wi / Σ wj with ``normalize``, else wi."""
    weight = np.asarray(_sparsify.per_model(options["weight"], n, "weight"), np.float64)
    if options["normalize"]:
        if weight.sum() == 0:
            raise ValueError(f"linear with normalize: the weights sum to 0 ({weight.tolist()})")
        return weight / weight.sum()
    return weight


def linear(models: jax.Array, weight: Any, *, normalize: bool = True) -> jax.Array:
    """mergekit ``linear`` (model soups, Wortsman et al., arXiv 2203.05482): Σ wi θi [/ Σ wi].

    Acts on the weights of every input model. mergekit adds a configured ``base_model`` to
    the inputs when it is not listed among the models, so it then takes part like any model
    (and needs a weight). Computed in float32 (float64 for
    float64 inputs), cast to the inputs' dtype. A zero weight sum with ``normalize`` is a
    ValueError when the weights are concrete (mergekit would divide by zero).

    Args:
      models: θi (N, ...). weight: wi, scalar or (N,), required. normalize: default True.
    """
    weight = _sparsify.per_model(weight, models.shape[0], "weight")
    if isinstance(weight, np.ndarray):
        if not np.all(np.isfinite(weight)):
            raise ValueError(f"weight must be finite, got {weight.tolist()}")
        if normalize and weight.sum() == 0:
            raise ValueError(f"linear with normalize: the weights sum to 0 ({weight.tolist()})")
    return _linear(models, jnp.asarray(weight, jnp.float32), normalize=bool(normalize))


@jax.jit
def _sce(tau, select_topk):
    rnd = _sparsify.rounder(tau.dtype)
    work = compute_dtype(tau.dtype)
    # the selected entries stay in tau's dtype (exact); each use widens its own slice
    x = jnp.where(_sparsify.variance_topk_mask(tau, select_topk, rnd)[None], tau, jnp.zeros((), tau.dtype))
    agree = _consensus.agreement_mask(x, "sum")
    energy = jnp.stack([rnd(jnp.mean(rnd(jnp.square(x[i].astype(work))))) for i in range(x.shape[0])])
    total = rnd(jnp.sum(energy))
    w = jnp.where(jnp.abs(total) < 1e-6, 1.0 / x.shape[0], rnd(divide(energy, total)))
    w = w.reshape((-1,) + (1,) * (x.ndim - 1))
    erased = jnp.where(agree, w, 0)
    merged = rnd(sum_leading(jnp.stack([rnd(x[i].astype(work) * erased[i]) for i in range(x.shape[0])])))
    return rnd(merged / jnp.maximum(rnd(sum_leading(erased)), 1e-6)).astype(tau.dtype)


def sce(tau: jax.Array, *, select_topk: Any = 1.0, int8_mask: bool = False) -> jax.Array:
    """mergekit ``sce`` (Wan et al., FuseChat, arXiv 2408.07990): select, calculate, erase.

    Select: keep the ⌊select_topk · #{var ≠ 0}⌋ entries of largest variance across models
    (one mask for all). Calculate: wi = mean(τ̂i²) / Σj mean(τ̂j²) (1/N each when that sum is
    < 1e-6 — an absolute threshold, reached by small deltas). Erase: TIES sum election on τ̂.
    M = Σi wi mi τ̂i / max(Σi wi mi, 1e-6). No per-model weight, no λ; base required.

    Args:
      tau: τi (N, ...) in the compute dtype. select_topk: in [0, 1], default 1 (keep all).
      int8_mask: accepted for mergekit's configs; no effect (it only sets mergekit's mask dtype).
    Returns:
      M (...,); the merged weight is θ0 + M.
    """
    if is_concrete(select_topk) and not 0 <= float(np.asarray(select_topk)) <= 1:
        raise ValueError(f"select_topk must lie in [0, 1], got {select_topk!r}")
    return _sce(tau, jnp.asarray(select_topk, jnp.float32))


def passthrough(model: jax.Array, scale: Any = None) -> jax.Array:
    """mergekit ``passthrough``: the one input tensor, times ``scale`` if given (no maths)."""
    if scale is None:
        return model
    return (model * jnp.asarray(scale, model.dtype)).astype(model.dtype)


__all__ = [
    "FAMILY",
    "IGNORED",
    "RANDOM",
    "SPARSIFIER_OPTIONS",
    "TaskArithmetic",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "generalized_task_arithmetic",
    "linear",
    "passthrough",
    "sce",
    "task_arithmetic",
    "ties",
]
