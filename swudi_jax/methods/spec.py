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

The merged weight is ``base + scale · fn(tau)``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax

KINDS = ("linear", "elementwise", "data")

TaskVectorChunks = Callable[[], Iterable[Any]]
"""A zero-argument callable returning a fresh iterable of task-vector stacks (N, ...), one per
merged leaf (whole-model preparation may iterate it more than once)."""



class Preparation(NamedTuple):
    """A whole-model pass run before the per-leaf merge.

    Attributes:
      what: what the pass computes, for error messages (e.g. "trim='model' needs ...").
      run: task-vector chunks → the options to add.
    """

    what: str
    run: Callable[[TaskVectorChunks], Mapping[str, Any]]


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


@dataclass(frozen=True)
class MethodSpec:
    """One merging method.

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
      leaf_inputs: ``leaf_inputs(options, path, layer) -> {name: array}``: per-leaf extra
        inputs (DARE's PRNG keys), stacked and vmapped with the leaves of a group.
      spectral_filter: for filtered spectral estimators, ``options -> SpectralFilter``, so
        the sharded and LoRA paths run the same filter.
      aliases: other names the registry accepts for this method.
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
    leaf_inputs: Callable[[Mapping[str, Any], str, int], Mapping[str, Any]] | None = None
    spectral_filter: Callable[[Mapping[str, Any]], SpectralFilter] | None = None
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not callable(self.fn):
            raise ValueError(f"method {self.name!r}: fn must be callable, got {self.fn!r}")
        if self.defaults is None:
            object.__setattr__(self, "defaults", keyword_defaults(self.fn, exclude=self.inputs))

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


@functools.lru_cache(maxsize=None)
def _signature_defaults(fn: Callable, exclude: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple((p.name, p.default) for p in params
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in exclude
                 and p.default is not inspect.Parameter.empty)


def keyword_defaults(fn: Callable, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``fn``'s keyword-only parameters with defaults, as {name: default}."""
    return dict(_signature_defaults(fn, tuple(exclude)))


__all__ = ["KINDS", "MethodSpec", "Preparation", "SpectralFilter", "TaskVectorChunks", "keyword_defaults"]
