"""What JAX training code holds, seen as the parameter pytree a merge reads, and the way back.

:func:`as_params` takes one model object as a user passes it and returns a :class:`ModelInput`:
the parameters to merge (a pytree of arrays whose flat paths name the leaves as their pure
dicts do) and ``rebuild``, which puts merged parameters back into an object of the type given.

- ``nnx.Module``: its ``nnx.Param`` variables (``nnx.split(module, nnx.Param, ...)``); the result
  is a new module of the same class (``nnx.merge``); the input module is not changed.
- ``nnx.State`` (``nnx.state(model)``, the state of ``nnx.split``): its ``nnx.Param`` variables as
  ``State.to_pure_dict()`` gives them; the result is a State of the same variables.
- ``(GraphDef, State, ...)`` as ``nnx.split`` returns it: the same tuple, states merged.
- A Linen/optax ``TrainState`` (anything with ``params``, ``opt_state`` and ``replace``): its
  ``params``; the result is ``base.replace(params=merged)``.
- Flax metadata boxes (``nn.Partitioned``, ``nnx.VariableState`` metadata) are unboxed for the
  merge and the result boxed again with the base's metadata.
- Any other pytree (Linen ``{"params": ...}`` variables, a flat dict of names) as it is.
- PRNG key leaves (typed ``jax.random.key`` arrays, e.g. the ``rngs`` of an NNX model's pure
  dict) are given as their key data (uint32), which merging passes through as it does integers;
  the result holds the base's keys again, of the same implementation.

What is not merged is said, never merged as weights: the variables of an NNX model that are
not ``nnx.Param`` (batch statistics, caches; RNG state too, unsaid) and a TrainState's ``step`` and
``opt_state`` are the base's in the result (:attr:`ModelInput.left_out`, warned by the merge);
optimizer states anywhere else in a tree (optax states, ``nnx.Optimizer``) are refused, naming
the path: optimizer moments have the parameters' shapes but are not weights.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple

import jax


class ModelInput(NamedTuple):
    """One model object as a merge reads it.

    Attributes:
      params: the pytree of arrays to merge.
      rebuild: merged params (same structure) → an object of the input's type.
      kind: what was given ("pytree", "nnx.Module", "nnx.State", "nnx.split", "TrainState").
      left_out: what the input holds besides ``params`` that the result takes from it unmerged.
    """

    params: Any
    rebuild: Callable[[Any], Any]
    kind: str
    left_out: tuple[str, ...] = ()


def _nnx():
    from flax import nnx

    return nnx


def imported_nnx() -> Any:
    """``flax.nnx`` when the process has imported it, else None: an NNX object exists only once
    it is, so a plain pytree's merge never pays for importing it."""
    return sys.modules.get("flax.nnx")


def _is_optimizer_state(node: Any) -> bool:
    module = type(node).__module__ or ""
    if module.startswith("optax") and hasattr(node, "_fields"):
        return True
    return type(node).__name__ == "Optimizer" and module.startswith("flax.nnx")


def refuse_optimizer_state(tree: Any, name: str) -> None:
    """Refuse a tree holding an optimizer state (an optax state or an ``nnx.Optimizer``), naming
    the path: its moments (mu, nu, ...) have the parameters' shapes and would merge as weights."""
    if _is_optimizer_state(tree):
        raise ValueError(f"{name}: is an optimizer state ({type(tree).__name__}), not model parameters; pass the "
                         "model (optimizer.model) or its parameters")
    found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_optimizer_state)[0]
    for keys, leaf in found:
        if _is_optimizer_state(leaf):
            where = jax.tree_util.keystr(keys)
            raise ValueError(f"{name}: {where} is an optimizer state ({type(leaf).__name__}); optimizer moments are "
                             "not weights and are never merged: pass the parameters only (e.g. state.params), or a "
                             "TrainState, whose params are merged and whose opt_state is left out")


def _split_params(state: Any) -> tuple[Any, Any, tuple[str, ...]]:
    """(Param state, the rest, what the rest holds) of an NNX State."""
    nnx = _nnx()
    params, rest = nnx.split_state(state, nnx.Param, ...)
    variables = jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
    kinds = sorted({type(v).__name__ for v in variables if not isinstance(v, nnx.RngState)})
    return params, rest, tuple(f"NNX {k} variables (the base's)" for k in kinds)


def _state_input(state: Any) -> tuple[Any, Callable[[Any], Any], tuple[str, ...]]:
    """(pure params, merged pure params → full State, left_out) of an NNX State."""
    nnx = _nnx()
    params, rest, left_out = _split_params(state)

    def rebuild(merged: Any) -> Any:
        new = jax.tree.map(lambda x: x, params)  # fresh Variables: the input state is not changed
        nnx.replace_by_pure_dict(new, merged)
        # the base's other Variables fresh too: a merged model's BatchNorm or Dropout updates its own
        return nnx.merge_state(new, jax.tree.map(lambda x: x, rest)) if jax.tree.leaves(rest) else new

    return nnx.to_pure_dict(params), rebuild, left_out


def _boxed_input(tree: Any) -> ModelInput | None:
    """Flax metadata boxes (``nn.Partitioned`` & co.) unboxed, or None when there are none."""
    from flax.core import meta

    def is_box(x):
        return isinstance(x, meta.AxisMetadata)

    if not any(is_box(x) for x in jax.tree.leaves(tree, is_leaf=is_box)):
        return None
    plain = jax.tree.map(lambda x: x.unbox() if is_box(x) else x, tree, is_leaf=is_box)

    def rebuild(merged: Any) -> Any:
        return jax.tree.map(lambda box, new: box.replace_boxed(new) if is_box(box) else new, tree, merged,
                            is_leaf=is_box)

    return ModelInput(plain, rebuild, "boxed pytree")


def as_params(obj: Any, name: str = "model") -> ModelInput:
    """``obj`` (an NNX module or state, an ``nnx.split`` tuple, a TrainState or a pytree) as
    the parameters a merge reads and the way back (see the module docstring).

    Raises:
      ValueError naming ``name`` and the path, for an optimizer state.
    """
    return _keys_as_data(_given_params(obj, name))


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_as_data(given: ModelInput) -> ModelInput:
    """``given`` with its PRNG key leaves as their key data, wrapped back as keys by ``rebuild``."""
    if not any(_is_key(x) for x in jax.tree.leaves(given.params)):
        return given

    def rebuild(merged: Any) -> Any:
        keys = jax.tree.map(lambda old, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
                            if _is_key(old) else new, given.params, merged)
        return given.rebuild(keys)

    data = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, given.params)
    return given._replace(params=data, rebuild=rebuild)


def _given_params(obj: Any, name: str) -> ModelInput:
    """:func:`as_params` before PRNG keys are replaced by their data."""
    nnx = imported_nnx()
    if nnx is not None:
        if isinstance(obj, nnx.Module):
            graph, state = nnx.split(obj)
            params, rebuild, left_out = _state_input(state)
            return ModelInput(params, lambda merged: nnx.merge(graph, rebuild(merged)), "nnx.Module", left_out)
        if isinstance(obj, nnx.State):
            params, rebuild, left_out = _state_input(obj)
            return ModelInput(params, rebuild, "nnx.State", left_out)
    if isinstance(obj, tuple) and obj and type(obj[0]).__name__ == "GraphDef":
        return _split_input(obj, name)
    if all(hasattr(obj, a) for a in ("params", "opt_state", "replace")):
        refuse_optimizer_state(obj.params, f"{name}.params")
        return ModelInput(obj.params, lambda merged: obj.replace(params=merged), "TrainState",
                          ("TrainState.step and TrainState.opt_state (the base's; optimizer moments are not merged)",))
    refuse_optimizer_state(obj, name)
    return _boxed_input(obj) or ModelInput(obj, lambda merged: merged, "pytree")


def _split_input(parts: tuple, name: str) -> ModelInput:
    """``(GraphDef, State, *States)`` from ``nnx.split``: the states' Params merged as one State."""
    nnx = _nnx()
    graph, *states = parts
    if not states or not all(isinstance(s, nnx.State) for s in states):
        raise ValueError(f"{name}: a (GraphDef, State, ...) tuple as nnx.split returns it was expected, got "
                         f"{tuple(type(p).__name__ for p in parts)}")
    whole = nnx.merge_state(*states) if len(states) > 1 else states[0]
    params, rebuild, left_out = _state_input(whole)

    def back(merged: Any) -> tuple:
        new = rebuild(merged)
        if len(states) == 1:
            return (graph, new)
        return (graph, *(_like(new, s) for s in states))

    return ModelInput(params, back, "nnx.split", left_out)


def _like(state: Any, part: Any) -> Any:
    """The variables of ``state`` at the paths of ``part`` (one of ``nnx.split``'s states)."""
    nnx = _nnx()
    flat = dict(nnx.to_flat_state(state))
    return nnx.from_flat_state([(path, flat[path]) for path, _ in nnx.to_flat_state(part)])


__all__ = ["ModelInput", "as_params", "imported_nnx", "refuse_optimizer_state"]
