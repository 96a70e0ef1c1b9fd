"""mergekit's ``slices:`` and ``modules:``: which source tensors make each output tensor.

Read as mergekit 0.1.5 reads them (``mergekit/plan.py`` ``MergePlanner``, ``mergekit/config.py``
``ConfigReader``, ``mergekit/merge.py`` ``_model_out_config``; read, not copied):

- a **slice** lists sources ``{model, layer_range: [start, end], parameters}``, all of one
  length n = end − start; the slices' layers follow one another: output layer k is layer j of
  slice s (k = j + the lengths of the slices before s), merged by the method from each
  source's layer start + j. Ranges may repeat or overlap (frankenmerges, SOLAR-style depth
  up-scaling); the output's layers are numbered 0, 1, ... in slice order;
- the tensors **outside the layers** come from the first slice (those before the layers:
  embeddings) or the last slice (those after: final norm, head), merged by the method from
  that slice's sources with that slice's parameters. mergekit pairs the last slice's sources
  with as many inputs as the first slice has: extra sources of the last slice are left out
  (warned here). Which tensors come before the layers is read from their names
  (:func:`position`); a name that tells neither is refused where it matters (the first and
  last slices differ);
- a slice's **base** is its own ``base_model``, else the config's. A method that uses a base
  (``slerp``, ``ties``, ...) finds it among the slice's sources, as mergekit requires;
  ``linear``, ``karcher`` and ``passthrough`` ignore the base: every source is an input;
- **parameters** are looked up per tensor, the first value found winning: the source's own
  ``parameters`` (per-model options only), the slice's, the module's, the global ones, then
  the method's default. The layer fraction t is j/(n − 1) within the slice (1 for a one-layer
  slice) and 0 outside the layers; a per-model option's ``filter`` is matched against the
  source tensor's name (its own layer number), a per-tensor option's against the output's;
- **config.json** (the base's, else the first source's) gets the output's layer count
  (``num_hidden_layers``, or the architecture's name for it) and its per-layer lists
  (``layer_types``) in the output's layer order (mergekit sets the count only; with a
  ``layer_types`` list, transformers 5 then refuses to save its config: "num_hidden_layers (4)
  must be equal to the number of layer_types (3)", and its output has no config.json);
- **modules**: ``modules: {default: {slices: [...] | models: [...], parameters}}`` is the
  one-module form (mergekit's name for the module of a one-stack architecture); a module's
  ``models:`` takes each model's whole range, the base added when not listed (mergekit's
  ``normalize_config``). The modules of multi-module architectures (``text_decoder``,
  ``vision_tower``, ``encoder``, ...) are defined by mergekit's architecture tables, which are
  not known here: refused, naming the layer stacks found.

The layers are found by name (``….layers.7.…``, also ``h.7``, ``blocks.7``, ``block.7``,
``layer.7``: the first such index in a name); a model with several layer stacks
(encoder/decoder, vision/text) takes ``modules:`` in mergekit, refused here. Tensors beside the
stack are kept (mergekit keeps only those its architecture table lists).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from swudi_jax.checkpoint.mergekit_config import LAYER_RE, evaluate_setting
from swudi_jax.maths.linalg import is_floating

SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
DEFAULT_MODULE = "default"
IGNORES_BASE = ("joins", "unused")
"""Base roles of methods whose base mergekit ignores in a slice (linear, karcher, passthrough)."""
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PER_LAYER_KEYS = ("layer_types",)
_HEADS = re.compile(r"(?:^|[._/])(?:lm_head|embed_out|score|classifier|head|output)(?:[._/]|$)")
_EMBEDDINGS = re.compile(r"(?:^|[._/])(?:\w*embed\w*|wte|wpe)(?:[._/]|$)")
_FINAL_NORMS = re.compile(r"(?:^|[._/])(?:norm|ln_f|norm_f|final_layernorm|final_layer_norm|final_norm|layer_norm|"
                          r"layernorm)(?:[._/]|$)")


@dataclass(frozen=True)
class SliceSource:
    """One source of a slice: ``model`` indexes the config's sources; ``layer_range`` None is the
    model's whole stack (a module's ``models:`` entry)."""

    model: int
    layer_range: tuple[int, int] | None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """One output slice: its sources, its base (an index of the config's sources, or None) and
    its parameters."""

    sources: tuple[SliceSource, ...]
    base: int | None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    base_given: bool = False  # the slice wrote its own base_model

    def roles(self, base_role: str) -> tuple[int | None, tuple[int, ...]]:
        """(the base's position among the sources or None, the experts' positions) for a method
        whose base role is ``base_role`` (:data:`swudi_jax.methods.spec.BASE_ROLES`)."""
        models = [s.model for s in self.sources]
        if base_role in IGNORES_BASE or self.base is None or self.base not in models:
            return None, tuple(range(len(models)))
        at = models.index(self.base)
        return at, tuple(i for i in range(len(models)) if i != at)


@dataclass(frozen=True)
class ModuleSlices:
    """One module of the output: its slices and its parameters (``given``: "slices" or
    "models", the form the config wrote)."""

    name: str
    slices: tuple[OutputSlice, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    given: str = "slices"


# ----------------------------------------------------------------------------- the config


class _Reader:
    """The config's ``slices``/``modules`` read into :class:`ModuleSlices` (see :func:`parse_modules`)."""

    def __init__(self, method, index_of, base, check, where):
        self.method, self.index_of, self.base, self.check, self.where = method, index_of, base, check, where

    def layer_range(self, value: Any, where: str) -> tuple[int, int]:
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{where}.layer_range must be [start, end] (two integers), got {value!r}")
        start, end = value
        if not 0 <= start < end:
            raise ValueError(f"{where}.layer_range {list(value)}: needs 0 <= start < end (end is not included)")
        return int(start), int(end)

    def source(self, value: Any, where: str) -> SliceSource:
        if not isinstance(value, Mapping) or "model" not in value:
            raise ValueError(f"{where} must be a mapping with `model` and `layer_range`, got {value!r}")
        bad = sorted(set(value) - set(SOURCE_KEYS))
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; a slice source has {list(SOURCE_KEYS)}")
        if "layer_range" not in value:
            raise ValueError(f"{where}: `layer_range` is required in a slice source (mergekit requires it)")
        return SliceSource(self.index_of(value["model"], f"{where}.model"), self.layer_range(value["layer_range"], where),
                           self.check(value.get("parameters"), f"{where}.parameters", True))

    def one_slice(self, piece: Any, where: str) -> OutputSlice:
        if not isinstance(piece, Mapping):
            raise ValueError(f"{where} must be a mapping with `sources`, got {piece!r}")
        bad = sorted(set(piece) - set(SLICE_KEYS))
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; a slice has {list(SLICE_KEYS)}")
        if piece.get("residual_weight") is not None:
            warnings.warn(f"{where}.residual_weight has no effect (mergekit 0.1.5 reads it and never uses it); "
                          "ignored", stacklevel=4)
        sources = piece.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ValueError(f"{where}.sources must be a non-empty list of {{model, layer_range}}")
        read = tuple(self.source(s, f"{where}.sources[{i}]") for i, s in enumerate(sources))
        lengths = [s.layer_range[1] - s.layer_range[0] for s in read]
        if len(set(lengths)) > 1:
            raise ValueError(f"{where}: every source of a slice must take the same number of layers (mergekit's "
                             f"rule), got ranges {[list(s.layer_range) for s in read]}")
        given = piece.get("base_model") is not None
        base = self.index_of(piece["base_model"], f"{where}.base_model") if given else self.base
        return self.checked(OutputSlice(read, base, self.check(piece.get("parameters"), f"{where}.parameters", False),
                                        given), where)

    def models_slice(self, models: Any, where: str) -> OutputSlice:
        """A module's ``models:``: each model's whole range, the base added when not listed."""
        if not isinstance(models, list) or not models:
            raise ValueError(f"{where} must be a non-empty list of models")
        read = []
        for i, entry in enumerate(models):
            model, params = (entry.get("model"), entry.get("parameters")) if isinstance(entry, Mapping) else (entry, None)
            if isinstance(entry, Mapping) and set(entry) - {"model", "parameters"}:
                raise ValueError(f"{where}[{i}]: a module's model entry has `model` and `parameters`, got {entry!r}")
            read.append(SliceSource(self.index_of(model, f"{where}[{i}]"), None,
                                    self.check(params, f"{where}[{i}].parameters", True)))
        if self.base is not None and self.base not in [s.model for s in read]:
            read.append(SliceSource(self.base, None, {}))  # mergekit adds the base to a module's models
        return self.checked(OutputSlice(tuple(read), self.base), where)

    def checked(self, piece: OutputSlice, where: str) -> OutputSlice:
        """mergekit's input contract for one slice: no model twice, the base among the sources
        where the method uses one, the method's number of inputs."""
        models = [s.model for s in piece.sources]
        if len(set(models)) != len(models):
            raise ValueError(f"{where}: a model appears twice among the slice's sources (mergekit refuses "
                             "duplicate merge inputs); use two slices to repeat layers")
        method = self.method
        if method.base not in IGNORES_BASE:
            if piece.base is not None and piece.base not in models:
                raise ValueError(f"{where}: the base model is not among the slice's sources; {method.name!r} merges "
                                 "each slice from its sources and finds its base there (as mergekit requires): list "
                                 "the base with its layer_range")
            if piece.base is None and method.base == "required":
                raise ValueError(f"{where}: {method.name!r} needs a base model: set `base_model` (the config's or "
                                 "the slice's) to one of the slice's sources")
        base_at, experts = piece.roles(method.base)
        low, high = method.n_experts
        if len(experts) < max(low, 1) or (high is not None and len(experts) > high):
            want = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
            besides = " besides the base" if base_at is not None else ""
            raise ValueError(f"{where}: {method.name!r} takes {want} model(s){besides} per slice, got {len(experts)}")
        return piece

    def module(self, name: str, body: Any) -> ModuleSlices:
        where = f"{self.where}: `modules.{name}`"
        if not isinstance(body, Mapping) or set(body) - set(MODULE_KEYS):
            raise ValueError(f"{where} must be a mapping of {list(MODULE_KEYS)}, got {body!r}")
        if (body.get("slices") is None) == (body.get("models") is None):
            raise ValueError(f"{where}: give `slices` or `models` (one of them), as mergekit requires")
        params = self.check(body.get("parameters"), f"{where}.parameters", False)
        if body.get("models") is not None:
            return ModuleSlices(str(name), (self.models_slice(body["models"], f"{where}.models"),), params, "models")
        return ModuleSlices(str(name), self.slices(body["slices"], f"{where}.slices"), params)

    def slices(self, value: Any, where: str) -> tuple[OutputSlice, ...]:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where} must be a non-empty list of slices ({{sources: [...]}})")
        return tuple(self.one_slice(piece, f"{where}[{i}]") for i, piece in enumerate(value))


def parse_modules(raw: Mapping[str, Any], method, index_of: Callable[[Any, str], int], base: int | None,
                  check: Callable[[Any, str, bool], Mapping[str, Any]], where: str) -> tuple[ModuleSlices, ...]:
    """A config's ``slices:`` or ``modules:`` (no tensor data read).

    Args:
      raw: the config mapping. method: the :class:`~swudi_jax.methods.spec.MethodSpec`.
      index_of: ``index_of(model entry, where)`` → its index among the config's sources.
      base: the index of the config's ``base_model``, or None.
      check: ``check(parameters, where, per_model)`` → the parameters kept (validated).
      where: the config's name, for messages.
    Raises:
      ValueError naming the key.
    """
    reader = _Reader(method, index_of, base, check, where)
    if raw.get("modules") is not None:
        if raw.get("slices") is not None:
            raise ValueError(f"{where}: give one of `models`, `slices` or `modules` (mergekit's rule)")
        if not isinstance(raw["modules"], Mapping) or not raw["modules"]:
            raise ValueError(f"{where}: `modules` must map module names to {{slices | models, parameters}}")
        modules = tuple(reader.module(name, body) for name, body in raw["modules"].items())
    else:
        modules = (ModuleSlices(DEFAULT_MODULE, reader.slices(raw["slices"], f"{where}: `slices`")),)
    for module in modules:
        if module.name != DEFAULT_MODULE:
            raise ValueError(f"{where}: `modules.{module.name}`: the modules of multi-module architectures "
                             "(text_decoder, vision_tower, encoder, ...) are defined by mergekit's architecture "
                             f"tables, which are not known here; a one-stack model's module is {DEFAULT_MODULE!r} "
                             "(or use top-level `slices:`)")
    return modules


def _source_raw(src: SliceSource, entries: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": entries[src.model]}
    if src.layer_range is not None:
        out["layer_range"] = list(src.layer_range)
    if src.parameters:
        out["parameters"] = dict(src.parameters)
    return out


def _slice_raw(piece: OutputSlice, entries: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"sources": [_source_raw(s, entries) for s in piece.sources]}
    if piece.base_given:
        out["base_model"] = entries[piece.base]
    if piece.parameters:
        out["parameters"] = dict(piece.parameters)
    return out


def to_raw(modules: Sequence[ModuleSlices], entries: Sequence[Any]) -> dict[str, Any]:
    """The ``slices:`` (or ``modules:``) entries that parse back to ``modules``; ``entries``: each
    config source's entry (as written, or its resolved spec)."""
    if len(modules) == 1 and modules[0].name == DEFAULT_MODULE and modules[0].given == "slices" \
            and not modules[0].parameters:
        return {"slices": [_slice_raw(p, entries) for p in modules[0].slices]}
    out = {}
    for m in modules:
        body: dict[str, Any]
        if m.given == "models":
            body = {"models": [_source_raw(s, entries) for s in m.slices[0].sources]}
        else:
            body = {"slices": [_slice_raw(p, entries) for p in m.slices]}
        if m.parameters:
            body["parameters"] = dict(m.parameters)
        out[m.name] = body
    return {"modules": out}


def describe_modules(modules: Sequence[ModuleSlices], entries: Sequence[Any]) -> list[str]:
    """One note per slice: the layers it takes from each source, in output order."""
    lines, start = [], 0
    for m in modules:
        for i, piece in enumerate(m.slices):
            parts = [f"{entries[s.model]}" + (f" [{s.layer_range[0]}, {s.layer_range[1]})" if s.layer_range else "")
                     for s in piece.sources]
            n = piece.sources[0].layer_range
            span = f"output layers {start}-{start + n[1] - n[0] - 1}" if n else "all layers"
            start += (n[1] - n[0]) if n else 0
            lines.append(f"slice {i}{'' if m.name == DEFAULT_MODULE else f' of module {m.name}'}: {span} from "
                         f"{' + '.join(parts)}" + (f", parameters {dict(piece.parameters)}" if piece.parameters else ""))
    return lines


# ----------------------------------------------------------------------------- the tensors


@dataclass(frozen=True)
class TensorRecipe:
    """One output tensor: ``inputs`` (source index, tensor name), the base first when ``has_base``;
    the slice whose parameters apply (``module``, ``slice``) and the layer fraction ``t``."""

    name: str
    inputs: tuple[tuple[int, str], ...]
    has_base: bool
    module: str
    slice: int
    t: float

    @property
    def input_set(self) -> tuple:
        return self.has_base, tuple(m for m, _ in self.inputs)


@dataclass(frozen=True)
class Stack:
    """A model's layer stack: the name prefix before the index, each layer's {suffix: name},
    and the tensors outside the stack."""

    prefix: str
    layers: tuple[Mapping[str, str], ...]
    outside: tuple[str, ...]


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, suffix) of a tensor name in a layer stack (its first index), or None."""
    found = LAYER_RE.search(name)
    if found is None:
        return None
    return name[:found.start(1)], int(found.group(1)), name[found.end(1):]


def find_stack(names: Sequence[str], who: str) -> Stack:
    """The one layer stack of a model's tensor names (refused: none, several, gaps)."""
    by_prefix: dict[str, dict[int, dict[str, str]]] = {}
    outside = []
    for name in names:
        parts = split_layer(name)
        if parts is None:
            outside.append(name)
            continue
        by_prefix.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = name
    if len(by_prefix) != 1:
        found = sorted(p.rstrip("./") for p in by_prefix) or "none"
        raise ValueError(f"{who}: slices need one stack of numbered layers (`….layers.N.…`); found {found}"
                         + (" (a multi-module model: mergekit's `modules:` form, whose module boundaries come "
                            "from its architecture tables, is not supported here)" if len(by_prefix) > 1 else ""))
    prefix, layers = next(iter(by_prefix.items()))
    count = max(layers) + 1
    missing = sorted(set(range(count)) - set(layers))
    if missing:
        raise ValueError(f"{who}: the layers {prefix}N are not numbered 0..{count - 1} (missing {missing[:5]})")
    return Stack(prefix, tuple(layers[i] for i in range(count)), tuple(outside))


def position(name: str) -> str | None:
    """Whether a tensor outside the layers comes "before" them (embeddings) or "after" them
    (final norm, head), read from its name; None when the name tells neither."""
    if _HEADS.search(name):
        return "after"
    if _EMBEDDINGS.search(name):
        return "before"
    if _FINAL_NORMS.search(name):
        return "after"
    return None


@dataclass(frozen=True)
class SlicePlan:
    """Every output tensor's recipe (in output order) and, per output layer, (source index,
    source layer) of its slice's first source."""

    recipes: Mapping[str, TensorRecipe]
    layers: tuple[tuple[int, int], ...]

    def signature(self, signatures: Sequence[Mapping[str, tuple]]) -> dict[str, tuple]:
        """{output name: (shape, dtype)} from each recipe's first input."""
        return {name: signatures[r.inputs[0][0]][r.inputs[0][1]] for name, r in self.recipes.items()}

    def input_sets(self) -> list[tuple]:
        return list(dict.fromkeys(r.input_set for r in self.recipes.values()))

    def has_base(self, name: str) -> bool:
        return self.recipes[name].has_base

    def read(self, names: Sequence[str], readers: Sequence[Any], read_group: Callable) -> tuple[dict, list[dict]]:
        """(base arrays, expert arrays) of output tensors of one input set, each {output name: array}
        (``read_group(reader, keys)`` reads and checks); without a base, the first input stands in
        as the base (shapes and dtypes only)."""
        recipes = [self.recipes[n] for n in names]
        wanted: dict[int, dict[str, None]] = {}
        for r in recipes:
            for model, key in r.inputs:
                wanted.setdefault(model, {})[key] = None
        arrays = {m: read_group(readers[m], list(keys)) for m, keys in wanted.items()}
        per_input = [{r.name: arrays[r.inputs[i][0]][r.inputs[i][1]] for r in recipes}
                     for i in range(len(recipes[0].inputs))]
        return per_input[0], (per_input[1:] if recipes[0].has_base else per_input)


class _Planner:
    """Expands a config's modules into :class:`TensorRecipe` s over the models' tensor names."""

    def __init__(self, method, signatures: Sequence[Mapping[str, tuple]], names: Sequence[str], where: str):
        self.method, self.signatures, self.names, self.where = method, signatures, names, where
        self.stacks: dict[int, Stack] = {}
        self.recipes: dict[str, TensorRecipe] = {}
        self.layers: list[tuple[int, int]] = []

    def stack(self, model: int) -> Stack:
        if model not in self.stacks:
            self.stacks[model] = find_stack(list(self.signatures[model]), f"{self.where}: {self.names[model]}")
        return self.stacks[model]

    def ranges(self, piece: OutputSlice, where: str) -> list[tuple[int, int]]:
        out = []
        for i, s in enumerate(piece.sources):
            count = len(self.stack(s.model).layers)
            start, end = s.layer_range or (0, count)
            if end > count:
                raise ValueError(f"{where}.sources[{i}].layer_range {[start, end]} goes past the "
                                 f"{count} layers of {self.names[s.model]}")
            out.append((start, end))
        if len({e - s for s, e in out}) > 1:
            raise ValueError(f"{where}: the sources' whole ranges differ in length {out}: their models have "
                             "different numbers of layers")
        return out

    def add(self, name: str, inputs: list[tuple[int, str]], has_base: bool, module: str, s: int, t: float,
            where: str) -> None:
        self.check_inputs(name, inputs, where)
        self.recipes[name] = TensorRecipe(name, tuple(inputs), has_base, module, s, t)

    def check_inputs(self, name: str, inputs: list[tuple[int, str]], where: str) -> None:
        for model, key in inputs:
            if key not in self.signatures[model]:
                raise ValueError(f"{where}: {self.names[model]} has no tensor {key!r} (output {name!r})")
        first_model, first_key = inputs[0]
        shape, dtype = self.signatures[first_model][first_key]
        for model, key in inputs[1:]:
            other_shape, other_dtype = self.signatures[model][key]
            if tuple(other_shape) != tuple(shape) or (other_dtype != dtype and not (is_floating(dtype)
                                                                                    and is_floating(other_dtype))):
                raise ValueError(f"{where}: output {name!r}: {self.names[model]}'s {key!r} is {list(other_shape)} "
                                 f"{other_dtype}, {self.names[first_model]}'s {first_key!r} is {list(shape)} {dtype}")

    def ordered(self, piece: OutputSlice, values: list) -> tuple[list, bool]:
        base_at, experts = piece.roles(self.method.base)
        order = ([base_at] if base_at is not None else []) + list(experts)
        return [values[i] for i in order], base_at is not None

    def plan_slice(self, module: ModuleSlices, s: int, where: str) -> None:
        piece = module.slices[s]
        ranges = self.ranges(piece, where)
        n = ranges[0][1] - ranges[0][0]
        stacks = [self.stack(src.model) for src in piece.sources]
        for j in range(n):
            out_layer = len(self.layers)
            self.layers.append((piece.sources[0].model, ranges[0][0] + j))
            layers = [stack.layers[start + j] for stack, (start, _) in zip(stacks, ranges)]
            for i, layer in enumerate(layers[1:], 1):
                if set(layer) != set(layers[0]):
                    diff = sorted(set(layer) ^ set(layers[0]))[:4]
                    raise ValueError(f"{where}: layer {ranges[i][0] + j} of {self.names[piece.sources[i].model]} "
                                     f"and layer {ranges[0][0] + j} of {self.names[piece.sources[0].model]} hold "
                                     f"different tensors ({diff})")
            t = j / (n - 1) if n > 1 else 1.0
            for suffix in layers[0]:
                out = f"{stacks[0].prefix}{out_layer}{suffix}"
                inputs, has_base = self.ordered(piece, [(src.model, layer[suffix])
                                                        for src, layer in zip(piece.sources, layers)])
                self.add(out, inputs, has_base, module.name, s, t, where)

    def plan_outside(self, module: ModuleSlices, where: str) -> tuple[list[str], list[str]]:
        """The tensors outside the layers: (before, after), each merged from its slice's sources."""
        first, last = module.slices[0], module.slices[-1]
        if len(last.sources) > len(first.sources):
            warnings.warn(f"{where}: the last slice has {len(last.sources)} sources, the first {len(first.sources)}: "
                          f"as in mergekit, the final norm and head are merged from the last slice's first "
                          f"{len(first.sources)} sources only", stacklevel=4)
            last = OutputSlice(last.sources[:len(first.sources)], last.base, last.parameters, last.base_given)
        same = first == last
        models = dict.fromkeys(src.model for src in (first.sources if same else first.sources + last.sources))
        names = list(dict.fromkeys(n for m in models for n in self.stack(m).outside))
        before, after = [], []
        for name in names:
            side = "before" if same else position(name)
            if side is None:
                raise ValueError(f"{where}: cannot tell whether {name!r} (outside the layers) comes before or after "
                                 "them; mergekit merges those before from the first slice and those after from the "
                                 "last slice, which differ here")
            piece, s = (first, 0) if side == "before" else (last, len(module.slices) - 1)
            inputs, has_base = self.ordered(piece, [(src.model, name) for src in piece.sources])
            if not has_base and self.method.base == "required":
                raise ValueError(f"{where}: {name!r} is merged from the last slice's first {len(piece.sources)} "
                                 f"source(s) (mergekit's pairing), which leave out its base")
            self.add(name, inputs, has_base, module.name, s, 0.0, where)
            (before if side == "before" else after).append(name)
        return before, after


def plan_tensors(modules: Sequence[ModuleSlices], method, signatures: Sequence[Mapping[str, tuple]],
                 names: Sequence[str], where: str) -> SlicePlan:
    """Expand the config's slices over the models' tensors (headers only): every output tensor's
    :class:`TensorRecipe`, the tensors outside the layers first, then the layers, then the rest.

    Args:
      modules: from :func:`parse_modules`. method: the MethodSpec.
      signatures: per config source, {tensor name: (shape, dtype)}. names: the sources as written.
    Raises:
      ValueError naming the model, range or tensor.
    """
    planner = _Planner(method, signatures, names, where)
    (module,) = modules
    for s in range(len(module.slices)):
        planner.plan_slice(module, s, f"{where}: `slices[{s}]`")
    before, after = planner.plan_outside(module, f"{where}: `slices`")
    layered = [n for n in planner.recipes if n not in set(before) | set(after)]
    recipes = {n: planner.recipes[n] for n in before + layered + after}
    return SlicePlan(recipes, tuple(planner.layers))


# ----------------------------------------------------------------------------- parameters


class SliceParameters:
    """The per-tensor values of a method's varying options in a sliced merge
    (:data:`swudi_jax.model.merger.TensorOptions`), in mergekit's lookup order (module docstring).

    Args:
      method: the MethodSpec. modules: from :func:`parse_modules`. plan: the :class:`SlicePlan`.
      global_settings: the global ``parameters`` that vary per tensor. defaults: the resolved options.
    """

    def __init__(self, method, modules: Sequence[ModuleSlices], plan: SlicePlan, global_settings: Mapping[str, Any],
                 defaults: Mapping[str, Any]):
        self.per_expert = tuple(method.per_expert)
        self.tensor_options = tuple(o for o in method.tensor_options if o not in self.per_expert)
        self.base_role = method.base
        self.modules = {m.name: m for m in modules}
        self.plan, self.global_settings, self.defaults = plan, dict(global_settings), dict(defaults)

    def _lookup(self, option: str, chain: Sequence[Mapping[str, Any]], name: str, t: float) -> Any:
        for settings in chain:
            if option in settings:
                value = evaluate_setting(name, settings[option], t)
                if value is not None:
                    return value
        return self.defaults.get(option)

    def __call__(self, path: str, layer: int | None) -> dict[str, Any]:
        recipe = self.plan.recipes[path]
        module = self.modules[recipe.module]
        piece = module.slices[recipe.slice]
        shared = (piece.parameters, module.parameters, self.global_settings)
        own = {s.model: s.parameters for s in piece.sources}
        experts = recipe.inputs[1:] if recipe.has_base else recipe.inputs
        out: dict[str, Any] = {}
        for option in self.per_expert:
            values = [self._lookup(option, (own.get(model, {}),) + shared, key, recipe.t) for model, key in experts]
            if any(v is None for v in values):
                raise ValueError(f"tensor {path!r}: parameter {option!r} has no value for some model of its slice "
                                 "(give it per source, per slice or globally)")
            out[option] = np.asarray(values, np.float64)
        for option in self.tensor_options:
            value = self._lookup(option, shared, path, recipe.t)
            if value is None:
                raise ValueError(f"tensor {path!r}: parameter {option!r} has no value (mergekit has no default for it)")
            out[option] = value
        return out


# ----------------------------------------------------------------------------- config.json


def _holder(content: dict) -> tuple[dict, str] | None:
    """The mapping and key of config.json's layer count (top level, else ``text_config``)."""
    for holder in (content, content.get("text_config")):
        if isinstance(holder, dict):
            for key in LAYER_COUNT_KEYS:
                if isinstance(holder.get(key), int) and not isinstance(holder.get(key), bool):
                    return holder, key
    return None


def write_layer_count(path: Path, plan: SlicePlan) -> str | None:
    """Set ``path``'s (config.json) layer count to the output's and reorder its per-layer lists
    (``layer_types``) by the source layers; returns the key set, None (with a warning) when the
    file has none."""
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError:
        warnings.warn(f"{path}: not valid JSON; the layer count is left as it was", stacklevel=2)
        return None
    found = _holder(content) if isinstance(content, dict) else None
    if found is None:
        warnings.warn(f"{path}: no layer count ({', '.join(LAYER_COUNT_KEYS)}) to set to the output's "
                      f"{len(plan.layers)} layers; set it by hand", stacklevel=2)
        return None
    holder, key = found
    old = holder[key]
    holder[key] = len(plan.layers)
    for name in PER_LAYER_KEYS:
        values = holder.get(name)
        if isinstance(values, list) and len(values) == old:
            holder[name] = [values[layer] for _, layer in plan.layers]
        elif values is not None:
            warnings.warn(f"{path}: `{name}` does not have {old} entries; left as it was", stacklevel=2)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return key


__all__ = [
    "DEFAULT_MODULE",
    "ModuleSlices",
    "OutputSlice",
    "SliceParameters",
    "SlicePlan",
    "SliceSource",
    "Stack",
    "TensorRecipe",
    "describe_modules",
    "find_stack",
    "parse_modules",
    "plan_tensors",
    "position",
    "split_layer",
    "to_raw",
    "write_layer_count",
]
