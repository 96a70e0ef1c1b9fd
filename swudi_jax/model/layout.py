"""Which leaves are merged how, and where their input axis is.

Every decision is made on flat parameter paths (``flax.traverse_util`` style), never in the
maths. A leaf gets one of four kinds:

- ``"linear"``: a linear weight; the layer method runs on it in maths layout (m outputs,
  n inputs). Every 2-D floating leaf is one (the embedding too, as the SWUDI reference
  does), except the output head (``head_patterns``) and leaves outside ``include``.
  ``layout="flax"``: a ``kernel`` is (in, out) and is transposed; a ``DenseGeneral`` kernel
  (ndim > 2) is reshaped to (in, out) by its number of leading input axes, given by
  ``input_axes`` (defaults: attention ``query``/``key``/``value`` kernels (in, heads, dim)
  have 1, ``out``/``o_proj`` kernels (heads, dim, out) have 2); any other 2-D leaf (an
  ``Embed`` table (vocab, features)) is taken as is. ``layout="torch"`` (HF/PyTorch): a
  2-D leaf is (out, in), already maths layout. A leaf matching ``scan_patterns`` has an
  extra layer axis (``scan_axis``, 0 under ``nn.scan``) and is a stack of layers.
- ``"mean"``: every other floating leaf (biases, norms, conv kernels, the head): it gets
  the mean task vector (elementwise methods such as TIES apply themselves here too).
  ``others="keep"`` makes these keep the base value instead.
- ``"keep"``: leaves matching ``exclude`` keep the base value, and so do empty floating leaves
  (a zero-size axis, e.g. (0, 16)): there is nothing to merge, every method's result is that
  same empty tensor.
- ``"passthrough"``: integer and boolean leaves are copied from the base unchanged.

Patterns: a string is an ``fnmatch`` glob (``*`` also crosses separators) that must match
the whole path or a tail of it starting after a "/" or "." separator — so ``lm_head*``
matches ``model.lm_head.weight`` and ``out/kernel`` matches ``enc/attn/out/kernel``; a
string starting with ``re:`` is a regular expression searched anywhere in the path.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import is_floating

LAYOUTS = ("flax", "torch")
NEVER_LINEAR = ("bias", "scale")
"""Leaf names that are never linear maps, whatever their ndim (a DenseGeneral bias (heads, dim),
a scanned LayerNorm scale (layers, features)): they get the mean task vector."""
OPTIMIZER_STATE = ("re:(^|[/.])opt_state([/.]|$)",)
"""Leaves under an ``opt_state`` (an orbax-saved TrainState): never merged; the base's values."""
LEAF_KINDS = ("linear", "mean", "keep", "passthrough")
OTHERS = ("mean", "keep")

DEFAULT_HEAD_PATTERNS: tuple[str, ...] = ("lm_head*",)
"""The output head is not merged spectrally (it gets the mean task vector)."""

DEFAULT_INPUT_AXES: dict[str, int] = {
    "query/kernel": 1,
    "key/kernel": 1,
    "value/kernel": 1,
    "q_proj/kernel": 1,
    "k_proj/kernel": 1,
    "v_proj/kernel": 1,
    "out/kernel": 2,
    "o_proj/kernel": 2,
}
"""Leading input axes of Flax ``DenseGeneral`` kernels (ndim > 2) by path pattern."""

WUDI_VIT_SCOPE: dict[str, Any] = {
    "include": (
        "attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight",
        "self_attn.[qkv]_proj.weight", "self_attn.out_proj.weight", "mlp.fc[12].weight",
        "query/kernel", "key/kernel", "value/kernel", "out/kernel", "MlpBlock*/Dense_*/kernel",
    ),
    "others": "keep",
}
"""The original WUDI ViT choice: merge only attention in/out and MLP matrices (open_clip,
HF CLIP and Flax ViT names) and keep everything else pretrained: ``merge(..., **WUDI_VIT_SCOPE)``."""


def infer_layout(paths: Iterable[str], fallback: str | None = None) -> str:
    """"flax" if any leaf is named ``kernel``, else "torch" if any is named ``weight``, else
    ``fallback`` (None: a ValueError)."""
    names = {re.split(r"[/.]", p)[-1] for p in paths}
    if "kernel" in names:
        return "flax"
    if "weight" in names:
        return "torch"
    if fallback is not None:
        return fallback
    raise ValueError("cannot infer the layout: no leaf is named 'kernel' (Flax) or 'weight' (PyTorch/HF); "
                     "pass layout='flax' or layout='torch'")


def _as_patterns(patterns: str | Iterable[str] | None, name: str) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{name} must be a pattern string or a list of them, got {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ValueError(f"{name}: invalid regular expression {p!r}: {exc}") from exc
    return patterns


def _tails(path: str) -> list[str]:
    return [path] + [path[i + 1:] for i, ch in enumerate(path) if ch in "/."]


def path_matches(path: str, patterns: str | Iterable[str] | None) -> bool:
    """True if any pattern matches ``path`` (globs on the path or a separator-led tail; ``re:`` regexes)."""
    for p in _as_patterns(patterns, "patterns"):
        if p.startswith("re:"):
            if re.search(p[3:], path):
                return True
        elif any(fnmatch.fnmatchcase(tail, p) for tail in _tails(path)):
            return True
    return False


def _lookup_input_axes(path: str, input_axes: Mapping[str, int]) -> int | None:
    for pattern, axes in input_axes.items():
        if path_matches(path, pattern):
            return axes
    return None


@dataclass(frozen=True)
class LeafPlan:
    """What happens to one leaf, and how its stacked values go to maths layout and back.

    Attributes:
      path: the flat path as given ("/" or "." separators).
      shape, dtype: the leaf's shape and dtype.
      kind: "linear", "mean", "keep" or "passthrough".
      maths_shape: (m, n) for linear leaves, the leaf shape otherwise.
      layers: how many maths matrices the leaf holds (> 1 for a scanned stack).
      scan_axis: the layer axis of a scanned leaf, else None.
      input_axes: leading input axes folded into n (Flax kernels), 0 if taken as is.
      transpose: True when the leaf is (in, out) and must be transposed to (out, in).
      group: leaves with one group key are stacked and merged in one compiled call.
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: str
    maths_shape: tuple[int, ...]
    layers: int = 1
    scan_axis: int | None = None
    input_axes: int = 0
    transpose: bool = False

    @property
    def group(self) -> tuple:
        return (self.kind, self.maths_shape, np.dtype(self.dtype).name)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_maths(self, stacked: Any) -> Any:
        """Stacked leaves (N, *shape) → (layers, N, m, n); see :func:`to_maths`."""
        return to_maths(self, stacked)

    def from_maths(self, merged: Any) -> Any:
        """Merged (layers, m, n) → the leaf's shape; see :func:`from_maths`."""
        return from_maths(self, merged)


@dataclass(frozen=True)
class LeafRules:
    """The structural rules of a merge, as one value: which leaves the method merges and how
    each maps to maths layout (see the module docstring). Built by the same constructor from
    Python keywords (:func:`swudi_jax.merge`) and from a YAML config (``swudi-merge``).

    Attributes:
      layout: "flax" (kernels (in, out)), "torch" (weights (out, in)) or "auto"
        (:func:`infer_layout` on the paths).
      include: if given, only linear weights matching it are merged by the method.
      exclude: leaves matching it keep the base value.
      head_patterns: output heads, never taken as linear weights (default ``lm_head*``).
      input_axes: {pattern: number of leading input axes} for Flax DenseGeneral kernels,
        consulted before :data:`DEFAULT_INPUT_AXES`.
      scan_patterns: leaves with a layer axis ``scan_axis`` (``nn.scan`` stacks); None (the
        default) detects them (:func:`detect_stacks`, a warned guess), ``()`` says there are none.
      scan_axis: that axis.
      others: what other floating leaves get: the "mean" task vector or "keep" the base.
    """

    layout: str = "flax"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS
    input_axes: tuple[tuple[str, int], ...] = ()
    scan_patterns: tuple[str, ...] | None = None
    scan_axis: int = 0
    others: str = "mean"

    def __post_init__(self):
        if self.layout not in LAYOUTS + ("auto",):
            raise ValueError(f"layout must be one of {LAYOUTS + ('auto',)}, got {self.layout!r}")
        if self.others not in OTHERS:
            raise ValueError(f"others must be one of {OTHERS}, got {self.others!r}")
        if isinstance(self.scan_axis, bool) or not isinstance(self.scan_axis, (int, np.integer)):
            raise ValueError(f"scan_axis must be an integer, got {self.scan_axis!r}")
        fields = {
            "include": None if self.include is None else _as_patterns(self.include, "include"),
            "exclude": _as_patterns(self.exclude, "exclude"),
            "head_patterns": _as_patterns(self.head_patterns, "head_patterns"),
            "scan_patterns": None if self.scan_patterns is None else _as_patterns(self.scan_patterns, "scan_patterns"),
            "input_axes": _as_input_axes(self.input_axes),
            "scan_axis": int(self.scan_axis),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def for_paths(self, paths: Iterable[str], fallback: str | None = None) -> "LeafRules":
        """These rules with ``layout="auto"`` resolved from the leaf names (:func:`infer_layout`;
        ``fallback`` where the names do not tell, e.g. from a checkpoint's format)."""
        if self.layout != "auto":
            return self
        return dataclasses.replace(self, layout=infer_layout(logical_paths(paths).values(), fallback))

    def plan(self, path: str, shape: Sequence[int], dtype: Any, name: str | None = None) -> LeafPlan:
        """Classify one leaf (see the module docstring for the rules and the pattern syntax);
        ``name``: the path the patterns and names are read on (default ``path``; an NNX
        variable's path without its trailing ``value``, :func:`logical_paths`)."""
        if self.layout == "auto":
            raise ValueError("layout 'auto' must be resolved first (LeafRules.for_paths)")
        path, stored = (path if name is None else name), path
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        plain = dict(path=stored, shape=shape, dtype=dtype, maths_shape=shape)
        if not is_floating(dtype):
            return LeafPlan(kind="passthrough", **plain)
        if path_matches(path, self.exclude) or math.prod(shape) == 0:
            return LeafPlan(kind="keep", **plain)
        other = LeafPlan(kind=self.others, **plain)

        scanned = path_matches(path, self.scan_patterns or ())
        inner, scan_axis = shape, self.scan_axis
        if scanned:
            if not -len(shape) <= scan_axis < len(shape) or len(shape) < 2:
                raise ValueError(f"{path}: scan_axis {scan_axis} is not an axis of shape {shape}")
            scan_axis = scan_axis % len(shape)
            inner = shape[:scan_axis] + shape[scan_axis + 1:]
        leaf_name = re.split(r"[/.]", path)[-1]
        is_kernel = self.layout == "flax" and leaf_name == "kernel"
        if leaf_name in NEVER_LINEAR:
            return other
        if len(inner) == 2:
            n_in = 1 if is_kernel else 0
        elif len(inner) > 2 and is_kernel:
            n_in = _lookup_input_axes(path, dict(self.input_axes))
            n_in = _lookup_input_axes(path, DEFAULT_INPUT_AXES) if n_in is None else n_in
            if n_in is None or not 0 < n_in < len(inner):
                return other  # a conv kernel or an unknown DenseGeneral: not a linear map we know
        else:
            return other
        if path_matches(path, self.head_patterns):
            return other
        if self.include is not None and not path_matches(path, self.include):
            return other
        if n_in:
            n, m = math.prod(inner[:n_in]), math.prod(inner[n_in:])
        else:
            m, n = inner
        return LeafPlan(
            path=stored, shape=shape, dtype=dtype, kind="linear", maths_shape=(m, n),
            layers=shape[scan_axis] if scanned else 1, scan_axis=scan_axis if scanned else None,
            input_axes=n_in, transpose=bool(n_in),
        )

    def plan_tree(self, flat_shapes_dtypes: Mapping[str, tuple[Sequence[int], Any]]) -> list[LeafPlan]:
        """One :class:`LeafPlan` per path of ``{path: (shape, dtype)}``, in the given order; every
        guess (:func:`plan_guesses`) is warned, in one message."""
        plans, guesses = self.plan_with_guesses(flat_shapes_dtypes)
        if guesses:
            warnings.warn("the layout of some leaves is a guess (check it with swudi_jax.plan or --dry-run):\n  "
                          + "\n  ".join(guesses), stacklevel=3)
        return plans

    def plan_with_guesses(self, flat_shapes_dtypes: Mapping[str, tuple[Sequence[int], Any]]
                          ) -> tuple[list[LeafPlan], tuple[str, ...]]:
        """(:meth:`plan_tree`'s plans, the guesses they rest on), warning nothing."""
        names = logical_paths(flat_shapes_dtypes)
        rules = self.for_paths(flat_shapes_dtypes)
        stacks: dict[str, int] = {}
        if rules.scan_patterns is None:
            stacks = detect_stacks({names[p]: v for p, v in flat_shapes_dtypes.items()})
            rules = dataclasses.replace(rules, scan_patterns=tuple(stack_pattern(p) for p in stacks))
        plans = []
        for path, (shape, dtype) in flat_shapes_dtypes.items():
            plan = rules.plan(path, shape, dtype, name=names[path])
            if plan.kind != "passthrough" and path_matches(names[path], OPTIMIZER_STATE):
                plan = dataclasses.replace(plan, kind="keep", maths_shape=plan.shape, layers=1, scan_axis=None,
                                           input_axes=0, transpose=False)
            plans.append(plan)
        return plans, plan_guesses(rules, plans, names, stacks)


def _as_input_axes(input_axes: Any) -> tuple[tuple[str, int], ...]:
    items = input_axes.items() if isinstance(input_axes, Mapping) else (input_axes or ())
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"input_axes must map path patterns to axis counts, got {input_axes!r}")
        pattern, axes = item
        _as_patterns(pattern, "input_axes")
        if isinstance(axes, bool) or not isinstance(axes, (int, np.integer)) or axes < 1:
            raise ValueError(f"input_axes[{pattern!r}] must be a positive integer, got {axes!r}")
        out.append((pattern, int(axes)))
    return tuple(out)


def plan_leaf(path: str, shape: Sequence[int], dtype: Any, **rules: Any) -> LeafPlan:
    """Classify one leaf under ``LeafRules(**rules)`` (see :class:`LeafRules`)."""
    return LeafRules(**rules).plan(path, shape, dtype)


def logical_paths(paths: Iterable[str]) -> dict[str, str]:
    """``{path: the path that names the leaf}``: an NNX state saved as a tree (orbax) ends every
    path in its variables' ``value``, which is dropped; other paths are their own names."""
    paths = list(paths)
    wrapped = len(paths) > 0 and all(re.search(r"[/.]value$", p) for p in paths)
    return {p: p[:-len("/value")] if wrapped else p for p in paths}


def _prefixes(path: str) -> list[str]:
    return [path[:i] for i, ch in enumerate(path) if ch in "/."]


def detect_stacks(flat_shapes_dtypes: Mapping[str, tuple[Sequence[int], Any]]) -> dict[str, int]:
    """``{prefix: layers}``: the outermost sub-trees that look like a scanned stack (``nn.scan``,
    ``nnx.scan``/``nnx.vmap`` over layers): at least two floating leaves, every one of ndim ≥ 2
    with the same leading size, and among them a ``bias`` or ``scale`` (1-D in one layer) of
    ndim ≥ 2. A guess from the shapes: :func:`plan_guesses` reports it."""
    floating = {p: tuple(int(d) for d in s) for p, (s, t) in flat_shapes_dtypes.items() if is_floating(np.dtype(t))}
    members: dict[str, list[str]] = {}
    for path in floating:
        for prefix in _prefixes(path):
            members.setdefault(prefix, []).append(path)
    found: dict[str, int] = {}
    for prefix in sorted(members, key=len):
        if any(prefix.startswith(f) and prefix[len(f)] in "/." for f in found):
            continue
        shapes = [floating[p] for p in members[prefix]]
        signs = [floating[p] for p in members[prefix] if re.split(r"[/.]", p)[-1] in NEVER_LINEAR]
        if (len(shapes) >= 2 and all(len(s) >= 2 for s in shapes) and len({s[0] for s in shapes}) == 1
                and any(len(s) >= 2 for s in signs)):
            found[prefix] = shapes[0][0]
    return found


def stack_pattern(prefix: str) -> str:
    """The ``scan_patterns`` entry that selects the leaves under ``prefix``."""
    return "re:^" + re.escape(prefix) + "[/.]"


def _listing(paths: Sequence[str], limit: int = 4) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(repr(p) for p in paths[:limit]) + more


def _sibling(name: str, leaf: str) -> str:
    cut = max(name.rfind("/"), name.rfind("."))
    return name[:cut + 1] + leaf


def _bias_confirms(plan: LeafPlan, names: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """A DenseGeneral kernel whose sibling ``bias`` has the shape of its output axes: its input
    axes are what the name said (Flax's attention with biases)."""
    bias = shapes.get(_sibling(names[plan.path], "bias"))
    if bias is None:
        return False
    if plan.scan_axis is None:
        return tuple(bias) == plan.shape[plan.input_axes:]
    axis = plan.scan_axis
    unstack = lambda shape: tuple(shape[:axis]) + tuple(shape[axis + 1:])  # noqa: E731
    return len(bias) > axis and unstack(bias) == unstack(plan.shape)[plan.input_axes:]


def plan_guesses(rules: LeafRules, plans: Sequence[LeafPlan], names: Mapping[str, str],
                 stacks: Mapping[str, int]) -> tuple[str, ...]:
    """One line per kind of guess the plans rest on: detected scan stacks, DenseGeneral kernels
    whose input axes come from their names, kernels of ndim > 2 that are not merged as linear
    maps, bias/scale leaves of ndim ≥ 2 outside a stack, optimizer states left out."""
    out = [f"{prefix!r}: every leaf shares a leading axis of {layers} and a bias/scale is stacked: merged as a "
           f"scanned stack of {layers} layers (scan_patterns=[{stack_pattern(prefix)!r}] says so; scan_patterns=[] "
           "says there is none)" for prefix, layers in stacks.items()]
    user_axes = dict(rules.input_axes)
    leaf = {p.path: re.split(r"[/.]", names[p.path])[-1] for p in plans}
    inner = {p.path: len(p.shape) - path_matches(names[p.path], rules.scan_patterns or ()) for p in plans}
    shapes = {names[p.path]: p.shape for p in plans}
    confirmed = {p.path for p in plans if p.kind == "linear" and inner[p.path] > 2 and _bias_confirms(p, names, shapes)}
    named = [p.path for p in plans if p.input_axes and inner[p.path] > 2 and p.path not in confirmed
             and _lookup_input_axes(names[p.path], user_axes) is None]
    if named:
        out.append(f"{_listing(named)}: DenseGeneral kernels, input axes taken from their names "
                   f"({dict(DEFAULT_INPUT_AXES)}; pass input_axes to state them)")
    unmerged = [p.path for p in plans if p.kind == "mean" and leaf[p.path] == "kernel" and inner[p.path] > 2]
    if unmerged:
        out.append(f"{_listing(unmerged)}: kernels of ndim > 2 with no input_axes (conv or DenseGeneral kernels, "
                   "or an undetected stack): given the mean task vector; pass input_axes={pattern: k} to merge them "
                   "as linear maps, or scan_patterns if they are stacks")
    explained = {_sibling(names[p], "bias") for p in confirmed}
    wide = [p.path for p in plans if leaf[p.path] in NEVER_LINEAR and inner[p.path] >= 2 and p.kind == "mean"
            and names[p.path] not in explained]
    if wide:
        out.append(f"{_listing(wide)}: bias/scale leaves of ndim ≥ 2: given the elementwise mean task vector "
                   "(a DenseGeneral bias, or a stack: pass scan_patterns)")
    kept = [p.path for p in plans if p.kind == "keep" and path_matches(names[p.path], OPTIMIZER_STATE)]
    if kept:
        out.append(f"{_listing(kept)}: optimizer state, not merged (the base's values)")
    return tuple(out)


def describe_groups(groups: Sequence[Sequence[LeafPlan]], method: str, elementwise: bool,
                    factors: Collection[str] = ()) -> list[str]:
    """The plan table: each leaf, its shape and dtype, its kind, what merges it ("<method>
    (factors)" for the leaves in ``factors``, merged from LoRA factors), and its group."""
    rows = [("tensor", "shape", "dtype", "kind", "method", "group")]
    for g, group in enumerate(groups):
        for p in group:
            how = {"linear": method, "mean": method if elementwise else "mean", "keep": "base",
                   "passthrough": "copy"}[p.kind] + (" (factors)" if p.path in factors else "")
            stack = f" ({p.layers} layers)" if p.layers > 1 else ""
            rows.append((p.path, "x".join(map(str, p.shape)) or "scalar", str(np.dtype(p.dtype)), p.kind + stack, how,
                         str(g)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def array_namespace(x: Any) -> Any:
    """``np`` for a NumPy array (host work, views where possible), ``jnp`` for anything else."""
    return np if isinstance(x, np.ndarray) else jnp


def to_maths(plan: LeafPlan, stacked: Any) -> Any:
    """Stacked leaves (N, *shape) → (layers, N, m, n) maths layout (linear leaves only); a
    NumPy array stays on the host (views where possible), anything else becomes a JAX array."""
    xp = array_namespace(stacked)
    x = xp.asarray(stacked)
    x = xp.moveaxis(x, plan.scan_axis + 1, 1) if plan.scan_axis is not None else x[:, None]
    lead = x.shape[:2]
    if plan.transpose:
        n_in = math.prod(x.shape[2:2 + plan.input_axes])
        x = xp.swapaxes(x.reshape(*lead, n_in, -1), -1, -2)
    return xp.swapaxes(x.reshape(*lead, *plan.maths_shape), 0, 1)


def from_maths(plan: LeafPlan, merged: Any) -> Any:
    """Merged maths matrices (layers, m, n) → the leaf's shape (inverse of :func:`to_maths`;
    NumPy stays NumPy, as there)."""
    xp = array_namespace(merged)
    x = xp.asarray(merged)
    inner = plan.shape if plan.scan_axis is None else (
        plan.shape[:plan.scan_axis] + plan.shape[plan.scan_axis + 1:])
    if plan.transpose:
        x = xp.swapaxes(x, -1, -2)
    x = x.reshape(plan.layers, *inner)
    return x[0] if plan.scan_axis is None else xp.moveaxis(x, 0, plan.scan_axis)


def group_plans(
    plans: Iterable[LeafPlan], max_group_bytes: int | None = None, *, copies: int = 1
) -> list[list[LeafPlan]]:
    """Leaves of one group key (kind, maths shape, dtype), in first-seen order, chunked.

    Every plan lands in exactly one group. A group is cut into chunks whose
    ``copies × Σ leaf bytes`` stays ≤ ``max_group_bytes`` (a leaf larger than that is a
    chunk of its own); pass ``copies = N + 1`` to count the base and N experts.
    """
    by_key: dict[tuple, list[LeafPlan]] = {}
    for plan in plans:
        by_key.setdefault(plan.group, []).append(plan)
    return [chunk for members in by_key.values() for chunk in chunk_by_bytes(members, max_group_bytes, copies=copies)]


def group_nbytes(plans: Sequence[LeafPlan]) -> int:
    """One model's bytes of the leaves in ``plans`` (a compile group)."""
    return sum(p.nbytes for p in plans)


def chunk_by_bytes(plans: Sequence[LeafPlan], max_group_bytes: int | None = None, *,
                   copies: int = 1) -> list[list[LeafPlan]]:
    """``plans`` cut, in order, into greedy chunks with ``copies × Σ leaf bytes ≤ max_group_bytes``
    (a leaf larger than that is a chunk of its own; None: one chunk)."""
    chunks: list[list[LeafPlan]] = [[]]
    size = 0
    for plan in plans:
        cost = copies * plan.nbytes
        if max_group_bytes is not None and chunks[-1] and size + cost > max_group_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(plan)
        size += cost
    return chunks


__all__ = [
    "DEFAULT_HEAD_PATTERNS",
    "DEFAULT_INPUT_AXES",
    "LAYOUTS",
    "LEAF_KINDS",
    "LeafPlan",
    "LeafRules",
    "NEVER_LINEAR",
    "OPTIMIZER_STATE",
    "WUDI_VIT_SCOPE",
    "array_namespace",
    "chunk_by_bytes",
    "describe_groups",
    "detect_stacks",
    "from_maths",
    "group_nbytes",
    "group_plans",
    "infer_layout",
    "logical_paths",
    "path_matches",
    "plan_guesses",
    "plan_leaf",
    "stack_pattern",
    "to_maths",
]
