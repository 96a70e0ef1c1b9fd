"""Name → method spec: the explicit list of built-in methods that the pytree merger, the
command, configs and benchmarks share (in the manner of mergekit's method registry).

Each method is one :class:`~swudi_jax.methods.spec.MethodSpec` defined in its own module;
this module lists them. Importing it has no side effect beyond building the table, and no
method module imports it. :func:`register` adds a user's spec for this process.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from swudi_jax.methods import average, dare, iwudi, mergekit, optmerge, output_space, regmean, swudi, task_arithmetic, ties, wudi
from swudi_jax.methods.spec import KINDS, MethodSpec, Resolved, SpectralFilter

BUILTIN_METHODS: tuple[MethodSpec, ...] = (
    swudi.SWUDI,
    swudi.SWUDI_A,
    swudi.PINV,
    wudi.WUDI,
    iwudi.IWUDI,
    optmerge.OPTMERGE,
    task_arithmetic.TASK_ARITHMETIC,
    average.AVERAGE,
    ties.TIES,
    dare.DARE,
    regmean.REGMEAN,
    output_space.OUTPUT_SPACE,
    *mergekit.MERGEKIT_METHODS,
)
"""The project's methods (``task_arithmetic_paper`` and ``ties_paper`` are the papers' own
defaults: λ = 0.3, and a whole-model trim at density 0.2) and mergekit's, by mergekit's names
and with mergekit's semantics (``task_arithmetic``, ``ties``, ``linear``, ...): one name, one
meaning, whatever the config's dialect."""

MERGEKIT_NAMES: tuple[str, ...] = tuple(spec.name for spec in mergekit.MERGEKIT_METHODS)
"""mergekit's methods, by mergekit's names and with its semantics."""

PROJECT_NAMES: tuple[str, ...] = tuple(spec.name for spec in BUILTIN_METHODS if spec.name not in MERGEKIT_NAMES)
"""The project's own methods (the demo and the benchmarks run these at their defaults)."""

DEFAULT_METHOD = swudi.SWUDI.name
"""What ``merge`` and the scale paths run when no method is named."""

_METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in BUILTIN_METHODS}
_ALIASES: dict[str, str] = {alias: spec.name for spec in BUILTIN_METHODS for alias in spec.aliases}


def register(method: MethodSpec) -> MethodSpec:
    """Add a user's method to the table (a second registration of one name replaces the first)."""
    if not isinstance(method, MethodSpec):
        raise ValueError(f"register() takes a MethodSpec, got {type(method).__name__}")
    _METHODS[method.name] = method
    _ALIASES.update({alias: method.name for alias in method.aliases})
    return method


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str | MethodSpec) -> MethodSpec:
    """The method registered under ``name`` or one of its aliases (a spec is returned as is)."""
    if isinstance(name, MethodSpec):
        return name
    if isinstance(name, str) and _ALIASES.get(name, name) in _METHODS:
        return _METHODS[_ALIASES.get(name, name)]
    close = difflib.get_close_matches(str(name), list(_METHODS) + list(_ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown merge method {name!r}{hint}; known methods: {sorted(_METHODS)}")


def resolve(method: str | MethodSpec | Resolved = DEFAULT_METHOD, options: Mapping[str, Any] | None = None,
            scale: float | None = None) -> Resolved:
    """The boundary's one resolution: a name (or alias) or spec and the user's options → a
    :class:`~swudi_jax.methods.spec.Resolved` (spec, validated options, scale). A ``Resolved``
    is returned as it is (it was resolved already); giving options or a scale with it is an error.

    Raises:
      ValueError: an unknown method (with the closest name) or option, an invalid value.
    """
    if isinstance(method, Resolved):
        if options or scale is not None:
            raise ValueError(f"method {method.spec.name!r} is already resolved (a Resolved value): give its options "
                             f"and scale when resolving it, not again here ({sorted(options or {})}, scale={scale})")
        return method
    return get_method(method).bind(options, scale)


def resolve_options(name: str | MethodSpec, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's defaults overridden by ``options``, validated (:meth:`MethodSpec.resolve`)."""
    return get_method(name).resolve(options)


def default_scale(name: str | MethodSpec, options: Mapping[str, Any] | None = None) -> float:
    """The scale ``merge(..., scale=None)`` uses for this method and these options."""
    return resolve(name, options).scale


def spectral(resolved: Resolved) -> SpectralFilter:
    """The filter of a filtered spectral method, for the paths that run the estimator by other
    means (rows over devices, LoRA factors).

    Raises:
      ValueError: the method is not a filtered spectral estimator, or its options are ones only
        the dense layer function runs.
    """
    if resolved.spec.spectral_filter is None:
        names = sorted(n for n, m in _METHODS.items() if m.spectral_filter is not None)
        raise ValueError(f"method {resolved.spec.name!r} is not a filtered spectral estimator; this path runs {names}")
    return resolved.spec.spectral_filter(dict(resolved.options))


MergeMethod = MethodSpec
"""The name of :class:`MethodSpec` before the method layer was redesigned (an alias)."""

__all__ = [
    "BUILTIN_METHODS",
    "DEFAULT_METHOD",
    "KINDS",
    "MERGEKIT_NAMES",
    "MergeMethod",
    "PROJECT_NAMES",
    "MethodSpec",
    "Resolved",
    "available_methods",
    "default_scale",
    "get_method",
    "register",
    "resolve",
    "resolve_options",
    "spectral",
]
