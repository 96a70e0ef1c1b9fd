"""The one definition of a merging method: a small immutable spec that every caller reads.

A method is a pure layer function of a task-vector stack plus what a merger needs to know
to call it: its kind, its user options with their defaults and checks, its default scale
and three optional hooks. The model merger, the checkpoint pipeline, the command line, the
sharded and LoRA paths and the benchmarks talk to a method only through this interface
(in the manner of an optax ``GradientTransformation`` and of mergekit's method objects).

Kinds, by the leaves the method merges (every other floating leaf gets the mean task vector):

- ``"linear"``: ``fn(tau, **options)`` on one linear weight's stack (N, m, n) in maths
  layout (m outputs, n inputs) → the merged task vector (m, n);
- ``"elementwise"``: ``fn(tau, **options)`` on any leaf's stack (N, ...) → (...), applied to
  every merged floating leaf;
- ``"data"``: ``fn(tau, grams, **options)``, a linear method that also takes the layer's
  per-task input Grams (N, n, n).

The merged weight is ``base + scale · fn(tau)``. A method whose ``operand`` is "models"
(mergekit's linear, slerp, karcher, model_stock, ...) takes the models' weights instead:
``fn(models, **options)`` on the stack θi (N, ...), plus ``base=θ0`` when ``"base"`` is one
of its ``inputs``, and returns the merged weight itself (no scale).

Per-expert and per-tensor options: options named in ``per_expert`` (mergekit's per-model
``weight``, ``density``, ...) take one value per expert, and options named in
``tensor_options`` may take a different value for each tensor (mergekit's conditional
``filter:`` lists and layer gradients). The merger resolves both per tensor and feeds them
to ``fn`` as arrays — (N,) per expert, () otherwise — vmapped with the layers of a group, so
one compiled call still serves a whole group whatever the values.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from swudi_jax.maths.linalg import compute_dtype
from swudi_jax.maths.validation import check_like_default, is_concrete

KINDS = ("linear", "elementwise", "data")
OPERANDS = ("task_vectors", "models")
BASE_ROLES = ("required", "optional", "joins", "unused")
"""How a method uses the base model: "required" (task vectors need it), "optional" (with a
base the method interpolates task vectors, without it the weights), "joins" (mergekit's
linear and karcher: a configured base is one more input model, not a reference), "unused"."""
COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")

TaskVectorChunks = Callable[[], Iterable[Any]]
"""A zero-argument callable returning a fresh iterable of task-vector stacks, one per leaf of
the selection the :class:`Preparation` asked for (whole-model preparation may iterate it more
than once)."""

CHUNK_LEAVES = ("merged", "linear_maths")
"""What a whole-model pass reads (:attr:`Preparation.leaves`): "merged", every merged leaf's
(linear and mean) task-vector stack (N, *leaf shape) in the model's own layout;
"linear_maths", the linear leaves' stacks in maths layout (layers, N, m, n)."""

ChunkSource = Callable[[str], Iterable[Any]]
"""What a merger offers a whole-model pass: ``source(leaves)`` (one of :data:`CHUNK_LEAVES`) →
a fresh iterable of task-vector stacks."""


class Combine(NamedTuple):
    """How a whole-model pass puts together what it computed from its chunks when the chunks are
    spread over several processes (a distributed merge: each process reads only its share).

    Attributes:
      sum: a statistic (a NumPy array, or None where this process read no chunk) → its
        elementwise sum over every process (exact for integer counts); None if none had one.
      in_order: one value per chunk this process read, in reading order → every chunk's value, in
        the order one process reading the whole model meets them (so float reductions over
        them round as in a single-process merge).
    """

    sum: Callable[[Any], Any]
    in_order: Callable[[Sequence[Any]], list[Any]]


LOCAL = Combine(sum=lambda statistic: statistic, in_order=list)
"""One process reads every chunk: nothing to combine."""


class Preparation(NamedTuple):
    """A whole-model pass run before the per-leaf merge.

    Attributes:
      what: what the pass computes, for error messages (e.g. "trim='model' needs ...").
      run: (task-vector chunks, :class:`Combine`) → the options to add; it passes what it
        computed from its chunks through the combine before deciding (:data:`LOCAL` in one process).
      leaves: which stacks ``run`` reads, one of :data:`CHUNK_LEAVES` (default "merged").
    """

    what: str
    run: Callable[[TaskVectorChunks, Combine], Mapping[str, Any]]
    leaves: str = "merged"


class SpectralFilter(NamedTuple):
    """How a filtered spectral estimator runs by other means (row-sharded, from LoRA factors).

    Attributes:
      make_h: ``(eigenvalues ascending, (m, n)) -> h``, the layer's filter.
      init: the anchor θ0 mode ("sum", "mean" or "zero").
      top: ``n -> K`` the number of leading eigenpairs the filter can be non-zero on, or
        ``n -> None`` when it may be non-zero anywhere.
    """

    make_h: Callable[[jax.Array, tuple[int, int]], jax.Array]
    init: str
    top: Callable[[int], int | None]


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """One merging method (compared and hashed by identity: a spec is a compile-cache key).

    Attributes:
      name: the registry key (``merge(..., method=name)``, ``merge_method:`` in configs).
      fn: the layer function (see the module docstring for its signature per kind).
      kind: "linear", "elementwise" or "data".
      source: the paper (and reference code) the method implements.
      defaults: every user option ``fn`` takes, with its default; None reads them from
        ``fn``'s keyword-only parameters (less ``inputs``), so the signature is the one
        place a default is written.
      default_scale: s in ``base + s · merged`` when the caller gives none: a number, or a
        function of the resolved options (DARE takes its hand-over method's).
      validate: checks the resolved options, raising ValueError naming the option.
      array_options: options whose values are arrays fed at call time (not static).
      inputs: keyword arguments of ``fn`` that the merger supplies per leaf (not options).
      prepare: whole-model preparation: ``prepare(options)`` is None when nothing is needed,
        else a :data:`Preparation` the merger runs over every merged leaf first (TIES's
        whole-model trim).
      leaf_inputs: ``leaf_inputs(options, path, layer, shape) -> {name: array}``: per-leaf
        extra inputs (DARE's PRNG keys, exact rank windows), stacked and vmapped with the
        leaves of a group; ``options`` hold that tensor's values of the varying options
        (per-expert ones as (N,) NumPy arrays) and ``shape`` is one layer's (maths) shape.
      spectral_filter: for filtered spectral estimators, ``options -> SpectralFilter``, so
        the sharded and LoRA paths run the same filter.
      combination: for methods whose result is a fixed linear combination of their operands,
        ``combination(options, n) -> c`` (N,): the merged task vector is Σ ci τi (operand
        "task_vectors", before the scale), or the merged weight Σ ci θi (operand "models").
        ``options`` hold one tensor's values (per-expert ones as (N,) arrays). Merges of LoRA
        adapters are then exact concatenated adapters (``out_format: peft``).
      aliases: other names the registry accepts for this method.
      per_expert: options taking one value per expert (a scalar is broadcast); the merger
        feeds each as an (N,) array per tensor.
      tensor_options: scalar options that may vary per tensor; fed as () arrays per tensor.
        (Every ``per_expert`` option may vary per tensor too.)
      operand: "task_vectors" (``fn(tau)`` → merged task vector) or "models" (``fn(models)``
        → merged weight, see the module docstring).
      base: how the method uses the base model, one of :data:`BASE_ROLES`.
      n_experts: (fewest, most or None) experts besides the base the method takes.
      compute_dtypes: the dtypes the method is defined in; a merge asked to compute in
        another runs in float32 (float64 stays float64).
      kept: for methods that sparsify before they combine (TIES, DARE, mergekit's family),
        ``kept(tau, **options, **inputs) -> (N, ...)``, called as ``fn`` is: the task vectors
        as the method keeps them (δi, zero where dropped); the merge report reads its kept
        density and sign-conflict share from them (:mod:`swudi_jax.model.report`).
    """

    name: str
    fn: Callable
    kind: str
    defaults: Mapping[str, Any] | None = None
    default_scale: float | Callable[[Mapping[str, Any]], float] = 1.0
    source: str = ""
    validate: Callable[[Mapping[str, Any]], None] | None = None
    array_options: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    prepare: Callable[[Mapping[str, Any]], Preparation | None] | None = None
    leaf_inputs: Callable[[Mapping[str, Any], str, int, tuple[int, ...]], Mapping[str, Any]] | None = None
    spectral_filter: Callable[[Mapping[str, Any]], SpectralFilter] | None = None
    combination: Callable[[Mapping[str, Any], int], Any] | None = None
    aliases: tuple[str, ...] = field(default=())
    per_expert: tuple[str, ...] = ()
    tensor_options: tuple[str, ...] = ()
    operand: str = "task_vectors"
    base: str = "required"
    n_experts: tuple[int, int | None] = (2, None)
    compute_dtypes: tuple[str, ...] = ("float32", "float64")
    kept: Callable | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.operand not in OPERANDS:
            raise ValueError(f"method {self.name!r}: operand must be one of {OPERANDS}, got {self.operand!r}")
        if self.base not in BASE_ROLES:
            raise ValueError(f"method {self.name!r}: base must be one of {BASE_ROLES}, got {self.base!r}")
        bad = sorted(set(self.compute_dtypes) - set(COMPUTE_DTYPES))
        if bad:
            raise ValueError(f"method {self.name!r}: compute_dtypes {bad} not in {COMPUTE_DTYPES}")
        if not callable(self.fn):
            raise ValueError(f"method {self.name!r}: fn must be callable, got {self.fn!r}")
        if self.defaults is None:
            object.__setattr__(self, "defaults", keyword_defaults(self.fn, exclude=self.inputs))
        unknown = sorted(set(self.per_expert + self.tensor_options) - set(self.defaults))
        if unknown:
            raise ValueError(f"method {self.name!r}: per_expert/tensor_options {unknown} are not options of it")

    @property
    def varying(self) -> tuple[str, ...]:
        """The options that may take a value per tensor (per-expert ones first)."""
        return self.per_expert + tuple(o for o in self.tensor_options if o not in self.per_expert)

    def work_dtype(self, requested: str) -> str:
        """The name of the dtype this method computes in when ``requested`` is asked for
        (:func:`~swudi_jax.maths.linalg.compute_dtype`): ``requested`` where the method is
        defined in it, else float32 (spectral methods in bf16, ...), before x64 narrows it."""
        return compute_dtype(requested=requested, defined_in=self.compute_dtypes, canonical=False).name

    def resolve(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults overridden by ``options``, validated.

        Raises:
          ValueError: naming an unknown option and listing the known ones, or from ``validate``.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for merge method {self.name!r} (it has no option of "
                f"that name); its options are {sorted(self.defaults) or 'none'}"
            )
        resolved = {**self.defaults, **options}
        if self.validate is not None:
            self.validate(resolved)
        return resolved

    def scale(self, resolved: Mapping[str, Any]) -> float:
        """The scale ``merge(..., scale=None)`` uses with these resolved options."""
        if callable(self.default_scale):
            return float(self.default_scale(resolved))
        return float(self.default_scale)

    def preparation(self, resolved: Mapping[str, Any]) -> Preparation | None:
        """The whole-model pass these resolved options need, or None."""
        return None if self.prepare is None else self.prepare(resolved)

    def bind(self, options: Mapping[str, Any] | None = None, scale: float | None = None) -> "Resolved":
        """This method with ``options`` resolved (:meth:`resolve`) and its scale decided: the
        value every stage below the boundary receives.

        Args:
          options: the user's options (defaults fill the rest).
          scale: s in ``base + s · merged``; None takes :meth:`scale` of the resolved options.
        Raises:
          ValueError: an unknown or invalid option, or a scale that is not a finite number.
        """
        traced = sorted(k for k, v in (options or {}).items() if not is_concrete(v) and k not in self.array_options)
        if traced or not is_concrete(scale):
            raise ValueError(f"{traced or ['scale']} of method {self.name!r} are traced values (jax.jit): a whole-model "
                             "merge compiles once per option set and takes static Python values; close over them, "
                             "or call the layer function under jax.jit (sj.swudi takes time, tikhonov_alpha and gamma "
                             "traced, sj.iwudi time, alpha and eta_ratio)")
        resolved = self.resolve(options)
        if scale is None:
            scale = self.scale(resolved)
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        return Resolved(self, MappingProxyType(resolved), float(scale))


class Resolved(NamedTuple):
    """A merge method resolved once at the boundary (``merge()``, the config parser, the public
    layer entry points) and passed down unchanged, as optax passes its ``GradientTransformation``:
    nothing below the boundary looks a method up by name or re-validates its options.

    Attributes:
      spec: the :class:`MethodSpec` (registered or not).
      options: every option of the method, validated (a read-only mapping).
      scale: s in ``base + s · merged task vector`` (the method's default when none was given).
    """

    spec: MethodSpec
    options: Mapping[str, Any]
    scale: float

    def with_options(self, extra: Mapping[str, Any]) -> "Resolved":
        """The same method with ``extra`` added to its options (a whole-model pass's results,
        or the options left after a path takes some of them out)."""
        return self._replace(options=MappingProxyType({**self.options, **extra}))

    def static(self, fed: Iterable[str]) -> dict[str, Any]:
        """The options passed to the layer function as plain keywords when the names in ``fed``
        (and the array options that have a value) are fed to it as arrays."""
        fed = set(fed)
        return {k: v for k, v in self.options.items()
                if not (k in self.spec.array_options and v is not None) and k not in fed}

    def without(self, names: Iterable[str]) -> "Resolved":
        """The same method without the options in ``names``."""
        names = set(names)
        return self._replace(options=MappingProxyType({k: v for k, v in self.options.items() if k not in names}))


@functools.lru_cache(maxsize=None)
def _signature_defaults(fn: Callable, exclude: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple((p.name, p.default) for p in params
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in exclude
                 and p.default is not inspect.Parameter.empty)


def keyword_defaults(fn: Callable, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``fn``'s keyword-only parameters with defaults, as {name: default}."""
    return dict(_signature_defaults(fn, tuple(exclude)))


def typed_options(spec: MethodSpec, names: Iterable[str] | None = None) -> MethodSpec:
    """``spec`` whose ``validate`` first checks that each option in ``names`` (default: all) has
    its default's kind (:func:`~swudi_jax.maths.validation.check_like_default`: true/false, a
    finite number, an integer, one per model for per-expert options), then runs its own checks.
    For methods whose validator does not check an option's kind itself."""
    names = tuple(spec.defaults if names is None else names)
    then = spec.validate

    def validate(options: Mapping[str, Any]) -> None:
        for name in names:
            check_like_default(options[name], name, spec.defaults[name], per_expert=name in spec.per_expert)
        if then is not None:
            then(options)

    return dataclasses.replace(spec, validate=validate)


def expert_weighted(spec: MethodSpec, default: float = 1.0) -> MethodSpec:
    """``spec`` with a per-expert option ``weight`` scaling each task vector first:
    ``fn(τ; weight=w) = spec.fn(w1·τ1, …, wN·τN)`` (w scalar or (N,), default 1 = unchanged).

    This is mergekit's per-model ``weight`` for methods that have none of their own (SWUDI,
    WUDI, ...): an expert with weight 0.5 enters the merge with half its task vector.
    """
    if spec.kind == "data" or spec.operand != "task_vectors" or "weight" in spec.defaults:
        raise ValueError(f"method {spec.name!r}: expert_weighted takes a task-vector method without a weight option")
    fn = spec.fn

    def weighted(tau, *, weight=default, **options):
        tau = jnp.asarray(tau)
        w = jnp.broadcast_to(jnp.asarray(weight, tau.dtype), (tau.shape[0],))
        return fn(tau * w.reshape((-1,) + (1,) * (tau.ndim - 1)), **options)

    functools.update_wrapper(weighted, fn)
    signature = inspect.signature(fn)
    extra = inspect.Parameter("weight", inspect.Parameter.KEYWORD_ONLY, default=default)
    weighted.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    weighted.__doc__ = (fn.__doc__ or "") + "\n\n    weight: per-expert scale of the task vectors (mergekit's per-model weight).\n"
    weighted_spec = dataclasses.replace(spec, fn=weighted, defaults={**spec.defaults, "weight": default},
                                        per_expert=spec.per_expert + ("weight",))
    return typed_options(weighted_spec, ("weight",))


__all__ = ["BASE_ROLES", "CHUNK_LEAVES", "COMPUTE_DTYPES", "ChunkSource", "Combine", "LOCAL", "KINDS", "OPERANDS", "MethodSpec", "Preparation", "Resolved", "SpectralFilter", "TaskVectorChunks", "expert_weighted", "keyword_defaults", "typed_options"]
