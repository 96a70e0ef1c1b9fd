"""Name → merging method: the one table the pytree merger, the command, configs and
benchmarks share (in the manner of mergekit's method registry).

A method is a pure layer-level function plus its defaults. Three kinds:

- ``"spectral"``: ``fn(tau, **options)`` takes one linear layer's task vectors (N, m, n) in
  maths layout (m outputs, n inputs) and returns the merged task vector (m, n). Applied to
  the linear weights; every other floating leaf gets the mean task vector.
- ``"elementwise"``: ``fn(tau, **options)`` takes task vectors of any shape (N, ...) and
  returns (...). Applied to every merged floating leaf.
- ``"data"``: ``fn(tau, grams, **options)`` also takes the per-task input Grams (N, n, n) of
  the layer; other floating leaves get the mean task vector.

The merged weight is ``base + scale · fn(tau)``; ``scale=None`` means the method's default
(0.3 for task arithmetic, 1 for the others).

Adding a method is one module that calls :func:`register` at import time and one import
line in :mod:`swudi_jax.methods`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

KINDS = ("spectral", "elementwise", "data")

_METHODS: dict[str, "MergeMethod"] = {}


@dataclass(frozen=True)
class MergeMethod:
    """One merging method.

    Attributes:
      name: the registry key (``merge(..., method=name)``, ``merge_method:`` in configs).
      fn: the layer-level function; see the module docstring for its signature per kind.
      kind: "spectral", "elementwise" or "data".
      defaults: every option ``fn`` accepts from users, with its default value.
      default_scale: s in ``base + s · merged task vector`` when the caller gives none.
      source: the paper (and reference code) the method implements.
      validate: optional check of the resolved options, raising ValueError before compute.
      scale_rule: optional ``options -> default scale`` when the default depends on an
        option (DARE takes the default of the method it hands over to).
      array_options: option names whose values are arrays fed to ``fn`` at call time
        (e.g. TIES's whole-model ``thresholds``) rather than static settings.
    """

    name: str
    fn: Callable
    kind: str
    defaults: Mapping[str, Any]
    default_scale: float
    source: str
    validate: Callable[[Mapping[str, Any]], None] | None = None
    scale_rule: Callable[[Mapping[str, Any]], float] | None = None
    array_options: tuple[str, ...] = field(default=())


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the table (a second registration of one name replaces the first)."""
    if not isinstance(method, MergeMethod):
        raise ValueError(f"register() takes a MergeMethod, got {type(method).__name__}")
    if method.kind not in KINDS:
        raise ValueError(f"method {method.name!r}: kind must be one of {KINDS}, got {method.kind!r}")
    _METHODS[method.name] = method
    return method


def _load_builtin_methods() -> None:
    import swudi_jax.methods  # noqa: F401  (each method module registers itself on import)


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    _load_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str | MergeMethod) -> MergeMethod:
    """The method registered under ``name`` (a MergeMethod is returned as is)."""
    if isinstance(name, MergeMethod):
        return name
    _load_builtin_methods()
    if not isinstance(name, str) or name not in _METHODS:
        close = difflib.get_close_matches(str(name), _METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown merge method {name!r}{hint}; known methods: {sorted(_METHODS)}")
    return _METHODS[name]


def resolve_options(name: str | MergeMethod, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's defaults overridden by ``options``, validated.

    Raises:
      ValueError: naming an unknown option and listing the method's known options, or
        from the method's own value checks.
    """
    method = get_method(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(method.defaults))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for merge method {method.name!r}; "
            f"its options are {sorted(method.defaults) or 'none'}"
        )
    resolved = {**method.defaults, **options}
    if method.validate is not None:
        method.validate(resolved)
    return resolved


def default_scale(name: str | MergeMethod, options: Mapping[str, Any] | None = None) -> float:
    """The scale ``merge(..., scale=None)`` uses for this method and these options."""
    method = get_method(name)
    if method.scale_rule is not None:
        return float(method.scale_rule(resolve_options(method, options)))
    return float(method.default_scale)


__all__ = [
    "KINDS",
    "MergeMethod",
    "available_methods",
    "default_scale",
    "get_method",
    "register",
    "resolve_options",
]
