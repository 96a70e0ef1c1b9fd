"""The merge config file (YAML, close to mergekit's), validated before any compute.

Example::

    base_model: ./base                 # a checkpoint: safetensors file/dir, orbax dir, .msgpack, .npz,
                                       # or a Hub id org/name[@revision] from the local HF cache
    models:                            # at least two experts fine-tuned from the base
      - ./expert_math
      - model: ./expert_code           # mergekit's mapping form is accepted too
      - ./lora_adapter                 # a PEFT adapter: base + its LoRA update
      - ./other_model+./lora_adapter   # mergekit's model+adapter
      - {model: ./ckpt, step: 100, item: params}   # orbax CheckpointManager: step (default latest), item
    allow_download: false              # Hub ids missing from the cache: download them (off: cache only)
    merge_method: swudi                # any name in swudi_jax.methods.registry.available_methods()
    parameters: {time: 10.0}           # the method's options (unknown names are refused)
    scale: null                        # base + scale · merged task vector (null: method default)
    include: null                      # patterns restricting the spectrally merged weights
    exclude: ["*embed_tokens*"]        # patterns of tensors that keep the base value
    head_patterns: null                # output heads, never merged spectrally (null: ["lm_head*"])
    others: mean                       # other float tensors: mean task vector, or keep the base
    input_axes: null                   # {pattern: leading input axes} of Flax DenseGeneral kernels
    scan_patterns: null                # tensors with a layer axis (Flax nn.scan stacks; null: detected and warned, []: none) ...
    scan_axis: 0                       # ... on this axis
    multi_device: auto                 # split big spectral layers' rows over all devices: auto, true, false
    layout: auto                       # torch (HF, weight is (out, in)), flax (kernel is (in, out)), or auto:
                                       # from the names (kernel: flax, weight: torch), else safetensors: torch
    dtype: null                        # compute dtype (null: mergekit's rule, the stored dtype for
                                       # its methods, float32 for the spectral ones; float64 turns
                                       # on jax_enable_x64)
    out_dtype: null                    # null: `dtype` when one is given, else each tensor's base dtype
    format: auto                       # input format; out_format defaults to it
    out_format: auto                   # or peft: a merge of LoRA adapters written as one adapter
    adapter_rank: null                 # out_format peft: truncate each module to this rank (null: exact, Σ rᵢ)
    out_shard_size: 5B                 # bytes per safetensors shard: mergekit's "5B" (5·10⁹ bytes),
                                       # "500M", or "5GB", "2GiB", an int
    tokenizer_source: base             # base, union, or a model path (mergekit's vocabulary: the
                                       # embedding and head rows follow it); or the tokenizer: block
    chat_template: auto                # a name (chatml, llama3, alpaca, mistral, zephyr, exaone), auto
                                       # (the models' own) or Jinja text, set in tokenizer_config.json

mergekit's schema is accepted as mergekit writes it (see :mod:`swudi_jax.checkpoint.mergekit_config`):
per-model ``parameters`` in ``models:`` entries, values that vary per tensor (conditional
``filter:`` lists, layer gradients), ``lambda`` for ``lam``, ``slices:`` and ``modules:``
(frankenmerges, depth up-scaling, per-slice ranges and parameters: :mod:`swudi_jax.checkpoint.slices`),
``base_model`` left out for methods that need none, the base listed among ``models`` (it is
the base, not an expert, as in mergekit; noted) and ``dtype: bfloat16``. What mergekit accepts
and ignores is accepted with one warning naming it: top-level keys its schema does not know
(``name:``) and the parameters of its other methods that this one has not (``int8_mask`` on
``swudi``, ``t`` on ``ties``).

Relative paths are resolved against the working directory, as mergekit resolves them; one that
exists only beside the config file is read from there. Patterns follow
:mod:`swudi_jax.model.layout`: a glob matching the path or a tail of it after a "/" or "."
separator (``lm_head*``), or ``re:<regex>`` searched anywhere in the path.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import yaml

from swudi_jax.checkpoint import mergekit_config as mk
from swudi_jax.checkpoint import slices as sl
from swudi_jax.checkpoint import vocabulary as voc
from swudi_jax.checkpoint.io import FORMATS, CheckpointError
from swudi_jax.checkpoint.io.sources import ModelSource, local_path, parse_model
from swudi_jax.checkpoint.yaml_loader import load_yaml
from swudi_jax.methods import registry
from swudi_jax.methods.spec import Resolved
from swudi_jax.model.layout import DEFAULT_HEAD_PATTERNS, OTHERS, LeafRules

LAYOUTS = ("auto", "torch", "flax")
COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")
OUT_DTYPES = ("float32", "float64", "float16", "bfloat16")
ADAPTER_FORMAT = "peft"
"""``out_format: peft``: the merge written as one PEFT LoRA adapter (experts: adapters over the base)."""
DEFAULT_SHARD_SIZE = 5 * 10**9
"""Bytes per output shard by default: mergekit's "5B"."""
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
"""Byte units: mergekit's ``parse_kmb`` suffixes K, M, B (thousands, millions, billions of bytes:
its writer sums numel × element size), and KB/MB/GB/TB, KiB/MiB/GiB/TiB."""
OPTION_ALIASES = {"lambda": "lam"}
"""mergekit parameter names spelled differently here (``lambda`` is a Python keyword)."""


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the offending key."""


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge config; paths are absolute, options are the method's resolved ones."""

    base_model: Path
    models: tuple[Path, ...]
    merge_method: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    scale: float | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    head_patterns: tuple[str, ...] | None = None
    others: str = "mean"
    input_axes: Mapping[str, int] | None = None
    scan_patterns: tuple[str, ...] | None = None
    scan_axis: int = 0
    multi_device: bool | str = "auto"
    layout: str = "auto"
    dtype: str | None = None               # None: mergekit's rule (the stored dtype, where the method is defined in it)
    out_dtype: str | None = None
    format: str = "auto"
    out_format: str = "auto"
    adapter_rank: int | None = None
    out_shard_size: int = DEFAULT_SHARD_SIZE
    grams: Path | None = None
    source: Path | None = None
    allow_download: bool = False
    sources: tuple[ModelSource, ...] = ()  # base then experts as resolved (Hub ids, adapters, orbax steps)
    has_base: bool = True                  # False: no base_model (sources[0] is the first model, for structure)
    model_parameters: tuple[Mapping[str, Any], ...] = ()  # per expert: its own mergekit `parameters`
    model_labels: tuple[str, ...] = ()     # per expert: where the config lists it (`models[2]`, `base_model`)
    tensor_parameters: Mapping[str, Any] = field(default_factory=dict)  # global settings that vary per tensor
    modules: tuple[sl.ModuleSlices, ...] | None = None  # `slices:`/`modules:`: what each output layer is made of
    tokenizer_source: Path | None = None   # a model folder whose tokenizer the output takes
    tokenizer: voc.TokenizerSpec | None = None  # tokenizer_source / tokenizer: (base, union, a folder; tokens)
    listed: tuple[ModelSource, ...] = ()   # the models as the config lists them (mergekit's order)
    chat_template: str | None = None       # template text for tokenizer_config.json
    notes: tuple[str, ...] = ()            # what the config's mergekit settings mean here (printed, in the card)
    given: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    """The checkpoint entries as written in the config (``base_model``, ``models``, ``grams``,
    ``tokenizer_source`` or ``tokenizer``), ``models`` in the order of the resolved experts; with
    ``slices``, ``sources``: every source's entry, in the order of :attr:`sources`."""
    source_text: str | None = field(default=None, compare=False, repr=False)
    """The config file's text as read (written to OUT as ``mergekit_config.yml``, as mergekit does)."""
    method: Resolved | None = field(default=None, compare=False, repr=False)
    """The method resolved once by the parser (spec, options, scale): what the pipeline runs;
    nothing below looks it up by name again, so an unregistered spec merges from disk too."""

    @property
    def varies_per_tensor(self) -> bool:
        """Whether some option takes per-model or per-tensor values (a resolver is needed)."""
        return bool(self.tensor_parameters) or any(self.model_parameters)

    def to_dict(self, *, as_given: bool = False) -> dict[str, Any]:
        """Plain YAML-able content (the resolved config written next to the merged model); it
        parses back to the same merge (per-model parameters inside the ``models`` entries,
        per-tensor settings among the ``parameters``).

        ``as_given=True`` records the checkpoint paths as the config wrote them (relative
        paths stay relative), not the absolute paths of this machine.
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("source", "sources", "given", "notes", "has_base", "model_parameters", "model_labels",
                    "tensor_parameters", "modules", "source_text", "method", "tokenizer", "listed",
                    "tokenizer_source"):
            out.pop(key)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = [str(v) for v in value]
            elif isinstance(value, Mapping):
                out[key] = dict(value)
        out["parameters"] = {k: _plain(v) for k, v in {**self.parameters, **self.tensor_parameters}.items()}
        if self.sources:  # entries that re-resolve to the same inputs (adapters, steps, pinned Hub ids)
            out["base_model"] = self.sources[0].spec()
            out["models"] = [s.spec() for s in self.sources[1:]]
        if self.tokenizer is not None:  # as written: base, union, a path, or the tokenizer: block
            written = {k: _plain(v) for k, v in self.tokenizer.given.items()}
            if "tokenizer_source" in written and isinstance(self.tokenizer.source, Path):
                written["tokenizer_source"] = str(self.tokenizer.source)
            out.update(written)
        if as_given and self.given:
            out.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.given.items()
                        if k != "sources"})
        if self.modules is not None:
            entries = list(self.given["sources"]) if as_given and self.given else [s.spec() for s in self.sources]
            del out["models"]
            out.update(sl.to_raw(self.modules, entries))
        if not self.has_base:  # a joining base stays named: it is among the models (found there when read back)
            out["base_model"] = None
        if any(self.model_parameters):
            out["models"] = [{**(m if isinstance(m, dict) else {"model": m}), "parameters": _plain(dict(p))} if p else m
                             for m, p in zip(out["models"], self.model_parameters)]
        return out

    def leaf_rules(self, layout: str | None = None) -> LeafRules:
        """The structural rules, as :func:`swudi_jax.merge` builds them from its keywords
        (``layout`` replaces the config's, e.g. once "auto" is resolved)."""
        return LeafRules(
            layout=self.layout if layout is None else layout, include=self.include, exclude=self.exclude,
            head_patterns=DEFAULT_HEAD_PATTERNS if self.head_patterns is None else self.head_patterns,
            input_axes=self.input_axes, scan_patterns=self.scan_patterns, scan_axis=self.scan_axis,
            others=self.others,
        )

    def to_yaml(self, *, as_given: bool = False) -> str:
        return yaml.safe_dump(self.to_dict(as_given=as_given), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def parse_size(value: Any, where: str) -> int:
    """Bytes from an int or a string: ``"5B"`` (mergekit's ``parse_kmb``: K, M, B are thousands,
    millions, billions of bytes), ``"500MB"``, ``"2GiB"`` (see :data:`_UNITS`)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a positive size in bytes, got {value!r}")
    if isinstance(value, (int, np.integer)):
        size = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).upper() not in _UNITS:
            raise ConfigError(f"{where} must be a size in bytes: an integer, mergekit's '5B' (billions of bytes), "
                              f"'500M', or '500MB', '2GiB'; got {value!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    else:
        raise ConfigError(f"{where} must be a positive size in bytes, got {value!r}")
    if size <= 0:
        raise ConfigError(f"{where} must be positive, got {value!r}")
    return size


def _patterns(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a pattern or a list of patterns, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern[3:]) if pattern.startswith("re:") else None
        except re.error as exc:
            raise ConfigError(f"{where}: invalid regular expression {pattern!r} ({exc})") from None
    return tuple(value)


def _choice(value: Any, choices, where: str) -> Any:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
    return value


def _given(value: Any) -> Any:
    """A checkpoint entry as the config wrote it: a path or Hub id, or the mapping form when it
    says more than ``model`` (an adapter, an orbax step or item)."""
    if isinstance(value, Mapping):
        return str(value["model"]) if set(value) == {"model"} else {str(k): v for k, v in value.items()}
    return str(value)


def _path(value: Any, base_dir: tuple[Path, ...], where: str) -> Path:
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {"model"})
        if "model" not in value or extra:
            raise ConfigError(f"{where} must be a path or a mapping with only a `model` key, got {dict(value)!r}")
        value = value["model"]
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{where} must be a path, got {value!r}")
    path = local_path(str(value), base_dir, where)
    if not path.exists():
        raise ConfigError(f"{where}: {path} does not exist")
    return path.resolve()


_KEYS = ("base_model", "models", "merge_method", "parameters", "scale", "include", "exclude",
         "head_patterns", "others", "input_axes", "scan_patterns", "scan_axis", "multi_device", "layout",
         "dtype", "out_dtype", "format", "out_format", "adapter_rank", "out_shard_size", "grams", "allow_download",
         "slices", "modules", "tokenizer_source", "tokenizer", "chat_template")


def _option_names(params: Mapping[Any, Any], where: str) -> dict[str, Any]:
    """``params`` with mergekit's spellings mapped to the options' names (``lambda`` → ``lam``);
    one option given under both spellings is refused, naming both."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in params.items():
        option = OPTION_ALIASES.get(str(key), str(key))
        if option in out:
            raise ConfigError(f"{where} gives both `{spelled[option]}` and `{key}`: they are one option (`lam` is "
                              "mergekit's `lambda`, a Python keyword); keep one")
        out[option], spelled[option] = value, str(key)
    return out


def _split_entry(entry: Any, where: str) -> tuple[Any, dict[str, Any]]:
    """A ``models:`` entry without its mergekit ``parameters`` (returned apart)."""
    if isinstance(entry, Mapping) and "parameters" in entry:
        params = entry["parameters"] or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.parameters must be a mapping of parameter: value, got {params!r}")
        rest = {k: v for k, v in entry.items() if k != "parameters"}
        return (rest["model"] if set(rest) == {"model"} else rest), _option_names(params, f"{where}.parameters")
    return entry, {}


def _check_settings(method, settings: Mapping[str, Any], where: str, model: Any = None) -> None:
    """Every scalar a setting can take passes the method's checks (mergekit's schema first); a
    refusal names the file and the key (``where`` names the mapping: ``config x.yaml: `parameters```)
    and the model."""
    for key, value in settings.items():
        at = (f"{where[:-1]}.{key}`" if where.endswith("`") else f"{where}.{key}") + \
            ("" if model is None else f" (model {model})")
        try:
            mk.check_setting(value, at)
        except mk.SettingError as exc:
            raise ConfigError(str(exc)) from None
        for leaf in _leaves(value):
            try:
                method.resolve({key: leaf})
            except ValueError as exc:
                raise ConfigError(f"{at}: {exc}") from None


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v["value"] if isinstance(v, Mapping) else v)]
    return [] if value is None else [value]


def _tokenizer(raw: Mapping[str, Any], base_dir: tuple[Path, ...], name: str) -> voc.TokenizerSpec | None:
    """``tokenizer_source`` / ``tokenizer:`` as mergekit reads them (:func:`~swudi_jax.checkpoint.vocabulary.parse_tokenizer`)."""
    try:
        return voc.parse_tokenizer(raw, lambda value, where: _path(value, base_dir, where), name)
    except voc.VocabularyError as exc:
        raise ConfigError(str(exc)) from None


def _check_top_level(raw: Any, name: str, overrides: Mapping[str, Any] | None):
    """The raw mapping with the command line's overrides, its keys known, and its method."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of settings, got {type(raw).__name__}")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    unknown = sorted(set(map(str, raw)) - set(_KEYS))
    if unknown:  # mergekit's schema ignores keys it does not know (`name:`, notes): so does this one, saying so
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k)
                 for k in unknown for close in [difflib.get_close_matches(k, _KEYS, n=1)]]
        warnings.warn(f"{name}: top-level key(s) {', '.join(hints)} have no effect (not config settings; ignored, "
                      f"as mergekit ignores them)", stacklevel=3)
        raw = {k: v for k, v in raw.items() if str(k) not in unknown}
    if raw.get("merge_method") is None:
        raise ConfigError(f"{name}: `merge_method` is required")
    try:
        method = registry.get_method(raw["merge_method"])
    except ValueError as exc:
        raise ConfigError(f"{name}: `merge_method`: {exc}") from None
    allow_download = raw.get("allow_download", False)
    if not isinstance(allow_download, bool):
        raise ConfigError(f"{name}: `allow_download` must be true or false, got {allow_download!r}")
    return raw, method


def _global_parameters(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The global ``parameters`` with mergekit's names mapped."""
    global_params = raw.get("parameters") or {}
    if not isinstance(global_params, Mapping):
        raise ConfigError(f"{name}: `parameters` must be a mapping of option: value, got {global_params!r}")
    return _option_names(global_params, f"{name}: `parameters`")


def _models_list(raw: Mapping[str, Any], name: str) -> list:
    models = raw.get("models")
    if models is None:
        raise ConfigError(f"{name}: `models` is required (or mergekit's `slices` / `modules`)")
    if not isinstance(models, (list, tuple)):
        raise ConfigError(f"{name}: `models` must be a list of checkpoint paths, got {models!r}")
    return list(models)


def _sources(raw: Mapping[str, Any], entries, base_dir: tuple[Path, ...], name: str):
    """The base's and the experts' resolved sources (Hub ids, adapters, orbax steps)."""
    allow_download = raw.get("allow_download", False)
    try:
        base_source = None
        if raw.get("base_model") is not None:
            base_source = parse_model(raw["base_model"], base_dir, f"{name}: `base_model`", allow_download=allow_download)
        expert_sources = [parse_model(m, base_dir, f"{name}: `models[{i}]`", allow_download=allow_download,
                                      base=base_source) for i, (m, _) in enumerate(entries)]
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    return base_source, expert_sources


def _place_base(raw, method, base_source, expert_sources: list, model_params: list, given_models: list,
                labels: list, notes: list) -> None:
    """The base among the models (mergekit's form: slerp lists both its models) is the base, as in
    mergekit, not a zero task vector; a base that joins the method's inputs (mergekit's linear,
    karcher) is added to them. In place (``labels`` name each expert as the config does)."""
    if base_source is not None and base_source in expert_sources:
        index = expert_sources.index(base_source)
        if method.base == "joins":
            notes.append(f"the base model is {labels[index]}: it is one of {method.name}'s inputs, as in mergekit")
        else:
            notes.append(f"{labels[index]} is the base model: it is the base, not an expert, as in mergekit")
            del expert_sources[index], model_params[index], given_models[index], labels[index]
    elif base_source is not None and method.base == "joins":
        expert_sources.append(base_source)  # mergekit appends a configured base to the inputs (their sums' order)
        model_params.append({})
        given_models.append(_given(raw["base_model"]))
        labels.append("base_model")
        notes.append(f"base_model joins {method.name}'s inputs (mergekit adds it to the models)")
    elif base_source is not None and method.base == "unused":
        notes.append(f"base_model is not used by {method.name}")


def _check_expert_sources(method, expert_sources, labels, name: str) -> None:
    seen: dict[ModelSource, str] = {}
    for label, src in zip(labels, expert_sources):
        if src in seen:
            warnings.warn(f"{name}: model {src.describe()} appears twice among the models ({seen[src]} and "
                          f"{label}): it counts twice in the merge", stacklevel=3)
        seen.setdefault(src, label)
    low, high = method.n_experts
    if len(expert_sources) < max(low, 1) or (high is not None and len(expert_sources) > high):
        words = {1: "one", 2: "two"}
        low_w, high_w = words.get(low, str(low)), words.get(high, str(high))
        want = f"exactly {low_w}" if low == high else (f"at least {low_w}" if high is None else f"{low_w} to {high_w}")
        raise ConfigError(f"{name}: `models` needs {want} experts to merge with {method.name!r} (the base is not "
                          f"counted), got {len(expert_sources)}")


def _global_options(method, global_params, name: str):
    """(plain options, per-tensor settings) of the global parameters; mergekit's parameters the
    method has not (``int8_mask`` on slerp, ``density`` on swudi, ...) are dropped with one warning."""
    options, tensor_settings, ignored = {}, {}, []
    for key, value in global_params.items():
        if key not in method.defaults and key in mk.MERGEKIT_PARAMETERS:
            ignored.append(key)
            continue
        if key not in method.defaults:
            try:
                method.resolve({key: value})
            except ValueError as exc:
                raise ConfigError(f"{name}: `merge_method`/`parameters`: {exc}") from None
        if mk.is_plain(value):
            options[key] = value
        elif key in method.varying:
            tensor_settings[key] = value
        else:
            raise ConfigError(f"{name}: `parameters.{key}` must be one value for the whole model (it changes the "
                              f"computation itself); the options of {method.name!r} that may vary per tensor are "
                              f"{list(method.varying) or 'none'}")
    if ignored:
        spelled = [{v: k for k, v in OPTION_ALIASES.items()}.get(k, k) for k in ignored]
        warnings.warn(f"{name}: `parameters` {spelled} have no effect with merge_method {method.name!r} "
                      "(mergekit parameters this method does not use; ignored, as mergekit ignores them)", stacklevel=4)
    _check_settings(method, tensor_settings, f"{name}: `parameters`")
    return options, tensor_settings


def _split_parameters(method, global_params, model_params: list, labels, given_models, name: str):
    """Plain values are options; settings that vary per tensor go to the resolver; per-model
    parameters that are not the method's per-model options are dropped with one warning (in place)."""
    options, tensor_settings = _global_options(method, global_params, name)
    ignored = {}
    for i, (label, given, params) in enumerate(zip(labels, given_models, model_params)):
        if set(params) - set(method.per_expert):
            ignored[label] = sorted(set(params) - set(method.per_expert))
            model_params[i] = {k: v for k, v in params.items() if k in method.per_expert}
        _check_settings(method, model_params[i], f"{name}: `{label}.parameters`", given)
    if ignored:
        which = "; ".join(f"`{label}.parameters` {keys}" for label, keys in ignored.items())
        warnings.warn(f"{name}: {which}: not per-model options of {method.name!r} (those are "
                      f"{list(method.per_expert) or 'none'}); no effect, as in mergekit", stacklevel=3)
    return options, tensor_settings


def _with_random_seed(method, global_params: dict[str, Any], random_seed: int | None, name: str) -> dict[str, Any]:
    """The command line's ``--random-seed`` as the ``seed`` of a method that draws at random
    (``dare_*``, ``della*``, ``dare``, ``arcee_fusion``'s quantile sample); said to have no effect otherwise."""
    if random_seed is None:
        return global_params
    if "seed" not in method.defaults:
        warnings.warn(f"--random-seed has no effect: merge_method {method.name!r} draws nothing at random",
                      stacklevel=3)
        return global_params
    if global_params.get("seed", random_seed) != random_seed:
        raise ConfigError(f"{name}: `parameters.seed` is {global_params['seed']!r} and --random-seed is "
                          f"{random_seed}: they set the same seed; give one")
    return {**global_params, "seed": random_seed}


def _check_joined_weight(method, base_source, expert_sources, model_params, options, tensor_settings, name) -> None:
    if method.base == "joins" and "weight" in method.per_expert and base_source is not None:
        joined = expert_sources.index(base_source)
        if "weight" not in model_params[joined] and "weight" not in options and "weight" not in tensor_settings \
                and any("weight" in p for p in model_params):
            raise ConfigError(f"{name}: the base model joins {method.name!r}'s inputs (as in mergekit) and needs a "
                              "`weight`: list it among `models` with one, give a global weight, or drop base_model")


def _method_settings(raw, method, options, base_dir: tuple[Path, ...], name: str, notes: list):
    """(the resolved method, grams path, compute dtype, out dtype)."""
    scale = raw.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale)):
        raise ConfigError(f"{name}: `scale` must be a finite number or null, got {scale!r}")
    try:
        resolved = method.bind(options, None if scale is None else float(scale))
    except ValueError as exc:
        raise ConfigError(f"{name}: `merge_method`/`parameters`: {exc}") from None
    if scale is not None and method.operand == "models":
        raise ConfigError(f"{name}: `scale` applies to a merged task vector; {method.name!r} returns merged weights")
    grams = raw.get("grams")
    grams = None if grams is None else _path(grams, base_dir, f"{name}: `grams`")
    if method.kind == "data" and grams is None:
        raise ConfigError(f"{name}: merge method {method.name!r} needs per-layer input Grams: set `grams` to a "
                          "checkpoint holding, for each linear weight path, an (N, n, n) array of the experts' input "
                          "Grams")
    dtype = raw.get("dtype")
    if dtype is not None and _choice(dtype, COMPUTE_DTYPES, f"{name}: `dtype`") and method.work_dtype(dtype) != dtype:
        notes.append(f"{method.name} computes in {method.work_dtype(dtype)}, not {dtype} (it is defined in "
                     f"{'/'.join(method.compute_dtypes)} only)")
    out_dtype = raw.get("out_dtype")
    if out_dtype is None and raw.get("dtype") is not None:
        out_dtype = raw["dtype"]  # mergekit: the output dtype is out_dtype, else dtype
    return resolved, grams, dtype, out_dtype


def _adapter_rank(raw: Mapping[str, Any], name: str) -> int | None:
    """``adapter_rank``: a positive integer, only with ``out_format: peft``."""
    rank = raw.get("adapter_rank")
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{name}: `adapter_rank` must be a positive integer or null, got {rank!r}")
    if raw.get("out_format") != ADAPTER_FORMAT:
        raise ConfigError(f"{name}: `adapter_rank` truncates a written LoRA adapter; it needs `out_format: "
                          f"{ADAPTER_FORMAT}` (got out_format {raw.get('out_format', 'auto')!r})")
    return rank


def _check_tokenizer_fits(raw: Mapping[str, Any], name: str) -> None:
    """A vocabulary re-indexes each model's embedding and head rows (:mod:`swudi_jax.checkpoint.vocab_rows`):
    refused for an adapter output (with ``slices:``/``modules:`` it must keep every model's rows
    as they are, checked once the tokenizers are read: :func:`~swudi_jax.checkpoint.pipeline.merge_checkpoints`)."""
    key = "tokenizer" if raw.get("tokenizer") is not None else "tokenizer_source"
    if raw.get("out_format") == ADAPTER_FORMAT:
        raise ConfigError(f"{name}: `{key}` with `out_format: {ADAPTER_FORMAT}` is not supported: a LoRA adapter "
                          "keeps base_model's vocabulary and cannot carry re-indexed embedding or head rows; leave "
                          f"`{key}` out, or merge to a dense checkpoint")


def _structure_and_outputs(raw, base_dir: tuple[Path, ...], name: str):
    """The checks of input_axes, scan_axis, tokenizer_source/tokenizer and chat_template."""
    input_axes = raw.get("input_axes")
    if input_axes is not None and not isinstance(input_axes, Mapping):
        raise ConfigError(f"{name}: `input_axes` must map path patterns to input-axis counts, got {input_axes!r}")
    scan_axis = raw.get("scan_axis", 0)
    if isinstance(scan_axis, bool) or not isinstance(scan_axis, int):
        raise ConfigError(f"{name}: `scan_axis` must be an integer, got {scan_axis!r}")
    tokenizer = _tokenizer(raw, base_dir, name)
    if tokenizer is not None:
        _check_tokenizer_fits(raw, name)
    chat_template = raw.get("chat_template")
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise ConfigError(f"{name}: `chat_template` must be a template name, 'auto' or Jinja template text, "
                              f"got {chat_template!r}")
        if chat_template != "auto":
            try:
                mk.resolve_chat_template(chat_template, (), f"{name}: `chat_template`")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return input_axes, scan_axis, tokenizer, chat_template


class _Inputs(NamedTuple):
    """The models a config reads and how: ``sources`` (the reference first: the base, else the
    first model), per-model parameters and the entries as written, the global options and the
    settings that vary per tensor, and the slices (None for the ``models:`` form)."""

    base: ModelSource | None
    sources: tuple[ModelSource, ...]
    model_params: list
    given_models: list
    options: dict
    tensor_settings: dict
    modules: tuple[sl.ModuleSlices, ...] | None = None
    given_sources: list | None = None
    labels: tuple[str, ...] = ()
    listed: tuple[ModelSource, ...] = ()


def _models_form(raw, method, base_dir: tuple[Path, ...], name: str, global_params, notes: list) -> _Inputs:
    """A ``models:`` config: the base and the experts, each expert's parameters."""
    models = _models_list(raw, name)
    if raw.get("base_model") is None and method.base == "required":
        raise ConfigError(f"{name}: `base_model` is required by merge method {method.name!r}")
    entries = [_split_entry(m, f"{name}: `models[{i}]`") for i, m in enumerate(models)]
    base_source, expert_sources = _sources(raw, entries, base_dir, name)
    listed = list(expert_sources)
    model_params = [p for _, p in entries]
    given_models = [_given(m) for m, _ in entries]
    labels = [f"models[{i}]" for i in range(len(entries))]
    _place_base(raw, method, base_source, expert_sources, model_params, given_models, labels, notes)
    _check_expert_sources(method, expert_sources, labels, name)
    options, tensor_settings = _split_parameters(method, global_params, model_params, labels, given_models, name)
    _check_joined_weight(method, base_source, expert_sources, model_params, options, tensor_settings, name)
    reference = base_source if base_source is not None else expert_sources[0]
    return _Inputs(base_source, (reference, *expert_sources), model_params, given_models, options, tensor_settings,
                   labels=tuple(labels), listed=tuple(listed))


def _slice_settings(method, name: str):
    """``check(parameters, where, per_model)`` for :func:`swudi_jax.checkpoint.slices.parse_modules`:
    names that are not the method's options (per-model ones, for a source) are ignored with a
    warning, as mergekit ignores them; a slice's or module's options must be ones that may vary
    per tensor (mergekit would change the computation itself per slice: refused)."""

    def check(params: Any, where: str, per_model: bool) -> dict[str, Any]:
        if params is None:
            return {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where} must be a mapping of parameter: value, got {params!r}")
        params = _option_names(params, where)
        known = method.per_expert if per_model else tuple(method.defaults)
        ignored = sorted(set(params) - set(known))
        if ignored:
            what = "per-model options" if per_model else "options"
            warnings.warn(f"{where} {ignored} are not {what} of {method.name!r} (those are {list(known) or 'none'}); "
                          "ignored, as mergekit ignores them", stacklevel=5)
            params = {k: v for k, v in params.items() if k in known}
        for key in params:
            if key not in method.varying:
                raise ConfigError(f"{where}.{key}: one value for the whole model (it changes the computation itself): "
                                  f"give it in the global `parameters`; the options of {method.name!r} that may vary "
                                  f"per slice are {list(method.varying) or 'none'}")
        _check_settings(method, params, where)
        return params

    return check


def _sliced_form(raw, method, base_dir: tuple[Path, ...], name: str, global_params, notes: list) -> _Inputs:
    """A ``slices:`` or ``modules:`` config (:mod:`swudi_jax.checkpoint.slices`): every model the
    slices read, the reference first (the base, else the first slice's first source)."""
    if raw.get("models") is not None:
        raise ConfigError(f"{name}: give one of `models`, `slices` or `modules` (mergekit's rule)")
    if method.kind == "data":
        raise ConfigError(f"{name}: {method.name!r} reads input Grams keyed by the models' tensor names; slices "
                          "rename layers, so it does not take `slices`")
    allow_download = raw.get("allow_download", False)
    sources: list[ModelSource] = []
    given: list[Any] = []

    def index_of(entry: Any, where: str) -> int:
        try:
            src = parse_model(entry, base_dir, where, allow_download=allow_download, base=base_source)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        if src not in sources:
            sources.append(src)
            given.append(_given(entry))
        return sources.index(src)

    base_source = None
    if raw.get("base_model") is not None:
        base_source = sources[index_of(raw["base_model"], f"{name}: `base_model`")]
    try:
        modules = sl.parse_modules(raw, method, index_of, 0 if base_source is not None else None,
                                   _slice_settings(method, name), name)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options, tensor_settings = _split_parameters(method, global_params, [], [], [], name)
    notes.extend(sl.describe_modules(modules, given))
    return _Inputs(base_source, tuple(sources), [{}] * (len(sources) - 1), given[1:], options, tensor_settings,
                   modules, given)


def parse_config(raw: Any, *, base_dir: str | os.PathLike = ".", source: str | os.PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None, config_dir: str | os.PathLike | None = None,
                 random_seed: int | None = None) -> MergeConfig:
    """Validate a config mapping (every check that needs no tensor data) into a MergeConfig.

    Args:
      raw: the parsed YAML mapping (the project's keys or mergekit's schema).
      base_dir: directory relative paths are resolved against (the working directory, as mergekit).
      config_dir: the config file's folder: a relative path that does not exist under ``base_dir``
        but does here is read from here (configs written beside their models); None: none.
      source: the config file, named in error messages.
      overrides: values that replace the file's (e.g. ``out_shard_size`` from the command line).
      random_seed: the command line's ``--random-seed``: the ``seed`` option of a method that has one.
    """
    name = f"config {source}" if source else "config"
    raw, method = _check_top_level(raw, name, overrides)
    notes: list[str] = []
    base_dir = (Path(base_dir),) if config_dir is None else (Path(base_dir), Path(config_dir))
    form = _sliced_form if raw.get("slices") is not None or raw.get("modules") is not None else _models_form
    global_params = _with_random_seed(method, _global_parameters(raw, name), random_seed, name)
    inputs = form(raw, method, base_dir, name, global_params, notes)
    base_source = inputs.base
    resolved, grams, dtype, out_dtype = _method_settings(raw, method, inputs.options, base_dir, name, notes)
    input_axes, scan_axis, tokenizer, chat_template = _structure_and_outputs(raw, base_dir, name)
    shard = parse_size(raw.get("out_shard_size", DEFAULT_SHARD_SIZE), f"{name}: `out_shard_size`")
    given = {"base_model": _given(raw["base_model"]) if base_source is not None else None,
             "models": inputs.given_models, **({} if inputs.given_sources is None else {"sources": inputs.given_sources}),
             **({} if grams is None else {"grams": _given(raw["grams"])}),
             **({} if tokenizer is None else {k: _plain(v) for k, v in tokenizer.given.items()})}
    sources, reference, model_params, tensor_settings = inputs.sources, inputs.sources[0], inputs.model_params, inputs.tensor_settings
    config = MergeConfig(
        base_model=reference.path,
        models=tuple(s.main for s in sources[1:]),
        merge_method=method.name,
        parameters=dict(resolved.options),
        scale=None if raw.get("scale") is None else resolved.scale,
        include=_patterns(raw.get("include"), f"{name}: `include`"),
        exclude=_patterns(raw.get("exclude"), f"{name}: `exclude`"),
        head_patterns=_patterns(raw.get("head_patterns"), f"{name}: `head_patterns`"),
        others=_choice(raw.get("others", "mean"), OTHERS, f"{name}: `others`"),
        input_axes=None if input_axes is None else dict(input_axes),
        scan_patterns=_patterns(raw.get("scan_patterns"), f"{name}: `scan_patterns`"),
        scan_axis=scan_axis,
        multi_device=_choice(raw.get("multi_device", "auto"), ("auto", True, False), f"{name}: `multi_device`"),
        layout=_choice(raw.get("layout", "auto"), LAYOUTS, f"{name}: `layout`"),
        dtype=dtype,
        out_dtype=None if out_dtype is None else _choice(out_dtype, OUT_DTYPES, f"{name}: `out_dtype`"),
        format=_choice(raw.get("format", "auto"), ("auto", *FORMATS), f"{name}: `format`"),
        out_format=_choice(raw.get("out_format", "auto"), ("auto", *FORMATS, ADAPTER_FORMAT), f"{name}: `out_format`"),
        adapter_rank=_adapter_rank(raw, name),
        out_shard_size=shard,
        grams=grams,
        source=None if source is None else Path(source),
        allow_download=raw.get("allow_download", False),
        sources=sources,
        has_base=base_source is not None,
        model_parameters=tuple(model_params),
        model_labels=inputs.labels,
        tensor_parameters=tensor_settings,
        modules=inputs.modules,
        tokenizer_source=tokenizer.source if tokenizer is not None and isinstance(tokenizer.source, Path) else None,
        tokenizer=tokenizer,
        listed=inputs.listed,
        chat_template=chat_template,
        notes=tuple(notes),
        given=given,
        method=resolved,
    )
    try:
        config.leaf_rules("torch")
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return config


def tensor_resolver(config: MergeConfig, paths, layers):
    """The per-tensor values of the method's varying options for this config (None when every
    option has one value for the whole model): :class:`~swudi_jax.checkpoint.mergekit_config.TensorParameters`."""
    if not config.varies_per_tensor:
        return None
    method = config.method.spec
    return mk.TensorParameters(method.per_expert, method.tensor_options, config.model_parameters,
                               config.tensor_parameters, list(paths), layers, config.parameters)


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *,
                random_seed: int | None = None) -> MergeConfig:
    """Read and validate a YAML merge config. Relative paths are taken from the working
    directory, as mergekit takes them, or, when they exist only there, from the config's folder.
    ``random_seed``: the command line's ``--random-seed`` (see :func:`parse_config`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = load_yaml(text)
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); is it a YAML file?") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: invalid YAML ({exc})".replace("\n", " ")) from None
    config = parse_config(raw, base_dir=Path.cwd(), config_dir=path.parent, source=path, overrides=overrides,
                          random_seed=random_seed)
    return replace(config, source_text=text)


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a config dtype name (bfloat16 via ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_SHARD_SIZE",
    "LAYOUTS",
    "OPTION_ALIASES",
    "OUT_DTYPES",
    "ConfigError",
    "MergeConfig",
    "load_config",
    "numpy_dtype",
    "parse_config",
    "parse_size",
    "tensor_resolver",
]
