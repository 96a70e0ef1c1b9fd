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
    scan_patterns: null                # tensors with a layer axis (Flax nn.scan stacks) ...
    scan_axis: 0                       # ... on this axis
    multi_device: auto                 # split big spectral layers' rows over all devices: auto, true, false
    layout: auto                       # torch (HF, weight is (out, in)), flax (kernel is (in, out)), or auto:
                                       # from the names (kernel: flax, weight: torch), else safetensors: torch
    dtype: float32                     # compute dtype (float64 turns on jax_enable_x64)
    out_dtype: null                    # null keeps each tensor's base dtype
    format: auto                       # input format; out_format defaults to it
    out_format: auto
    out_shard_size: 5GB                # bytes per safetensors shard (int or "500MB", "2GiB")

Relative paths are resolved against the config file's directory. Patterns follow
:mod:`swudi_jax.model.layout`: a glob matching the path or a tail of it after a "/" or "."
separator (``lm_head*``), or ``re:<regex>`` searched anywhere in the path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import yaml

from swudi_jax.checkpoint.io import FORMATS, CheckpointError
from swudi_jax.checkpoint.io.sources import ModelSource, parse_model
from swudi_jax.methods import registry
from swudi_jax.model.layout import DEFAULT_HEAD_PATTERNS, OTHERS, LeafRules

LAYOUTS = ("auto", "torch", "flax")
COMPUTE_DTYPES = ("float32", "float64")
OUT_DTYPES = ("float32", "float64", "float16", "bfloat16")
DEFAULT_SHARD_SIZE = 5 * 1024**3
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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
    dtype: str = "float32"
    out_dtype: str | None = None
    format: str = "auto"
    out_format: str = "auto"
    out_shard_size: int = DEFAULT_SHARD_SIZE
    grams: Path | None = None
    source: Path | None = None
    allow_download: bool = False
    sources: tuple[ModelSource, ...] = ()  # base then experts as resolved (Hub ids, adapters, orbax steps)
    given: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    """The checkpoint entries as written in the config (``base_model``, ``models``, ``grams``)."""

    def to_dict(self, *, as_given: bool = False) -> dict[str, Any]:
        """Plain YAML-able content (the resolved config written next to the merged model).

        ``as_given=True`` records the checkpoint paths as the config wrote them (relative
        paths stay relative), not the absolute paths of this machine.
        """
        out = asdict(self)
        out.pop("source")
        out.pop("sources")
        out.pop("given")
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = [str(v) for v in value]
            elif isinstance(value, Mapping):
                out[key] = dict(value)
        out["parameters"] = {k: _plain(v) for k, v in self.parameters.items()}
        if self.sources:  # entries that re-resolve to the same inputs (adapters, steps, pinned Hub ids)
            out["base_model"] = self.sources[0].spec()
            out["models"] = [s.spec() for s in self.sources[1:]]
        if as_given and self.given:
            out.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.given.items()})
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
    """Bytes from an int or a string such as ``"500MB"`` or ``"2GiB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a positive size in bytes, got {value!r}")
    if isinstance(value, (int, np.integer)):
        size = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).upper() not in _UNITS:
            raise ConfigError(f"{where} must be bytes or a size like '500MB' or '2GiB', got {value!r}")
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


def _path(value: Any, base_dir: Path, where: str) -> Path:
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {"model"})
        if "model" not in value or extra:
            raise ConfigError(f"{where} must be a path or a mapping with only a `model` key, got {dict(value)!r}")
        value = value["model"]
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{where} must be a path, got {value!r}")
    path = Path(os.path.expanduser(str(value)))
    path = path if path.is_absolute() else (base_dir / path)
    if not path.exists():
        raise ConfigError(f"{where}: {path} does not exist")
    return path.resolve()


_KEYS = ("base_model", "models", "merge_method", "parameters", "scale", "include", "exclude",
         "head_patterns", "others", "input_axes", "scan_patterns", "scan_axis", "multi_device", "layout",
         "dtype", "out_dtype", "format", "out_format", "out_shard_size", "grams", "allow_download")


def parse_config(raw: Any, *, base_dir: str | os.PathLike = ".", source: str | os.PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None) -> MergeConfig:
    """Validate a config mapping (every check that needs no tensor data) into a MergeConfig.

    Args:
      raw: the parsed YAML mapping.
      base_dir: directory relative paths are resolved against.
      source: the config file, named in error messages.
      overrides: values that replace the file's (e.g. ``out_shard_size`` from the command line).
    """
    name = f"config {source}" if source else "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of settings, got {type(raw).__name__}")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; known keys: {list(_KEYS)}")
    for key in ("base_model", "models", "merge_method"):
        if raw.get(key) is None:
            raise ConfigError(f"{name}: `{key}` is required")
    base_dir = Path(base_dir)
    allow_download = raw.get("allow_download", False)
    if not isinstance(allow_download, bool):
        raise ConfigError(f"{name}: `allow_download` must be true or false, got {allow_download!r}")
    models = raw["models"]
    if not isinstance(models, (list, tuple)):
        raise ConfigError(f"{name}: `models` must be a list of checkpoint paths, got {models!r}")
    if len(models) < 2:
        raise ConfigError(f"{name}: `models` needs at least two experts to merge, got {len(models)}")
    try:
        base_source = parse_model(raw["base_model"], base_dir, f"{name}: `base_model`", allow_download=allow_download)
        sources = (base_source, *(parse_model(m, base_dir, f"{name}: `models[{i}]`", allow_download=allow_download,
                                              base=base_source) for i, m in enumerate(models)))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    base, experts = sources[0].path, tuple(s.main for s in sources[1:])
    method = raw["merge_method"]
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ConfigError(f"{name}: `parameters` must be a mapping of option: value, got {parameters!r}")
    try:
        resolved = registry.resolve_options(method, parameters)
        kind = registry.get_method(method).kind
    except ValueError as exc:
        raise ConfigError(f"{name}: `merge_method`/`parameters`: {exc}") from None
    scale = raw.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale)):
        raise ConfigError(f"{name}: `scale` must be a finite number or null, got {scale!r}")
    grams = raw.get("grams")
    grams = None if grams is None else _path(grams, base_dir, f"{name}: `grams`")
    if kind == "data" and grams is None:
        raise ConfigError(f"{name}: merge method {method!r} needs per-layer input Grams: set `grams` to a checkpoint "
                          "holding, for each linear weight path, an (N, n, n) array of the experts' input Grams")
    out_dtype = raw.get("out_dtype")
    input_axes = raw.get("input_axes")
    if input_axes is not None and not isinstance(input_axes, Mapping):
        raise ConfigError(f"{name}: `input_axes` must map path patterns to input-axis counts, got {input_axes!r}")
    scan_axis = raw.get("scan_axis", 0)
    if isinstance(scan_axis, bool) or not isinstance(scan_axis, int):
        raise ConfigError(f"{name}: `scan_axis` must be an integer, got {scan_axis!r}")
    config = MergeConfig(
        base_model=base,
        models=experts,
        merge_method=method,
        parameters=resolved,
        scale=None if scale is None else float(scale),
        include=_patterns(raw.get("include"), f"{name}: `include`"),
        exclude=_patterns(raw.get("exclude"), f"{name}: `exclude`"),
        head_patterns=_patterns(raw.get("head_patterns"), f"{name}: `head_patterns`"),
        others=_choice(raw.get("others", "mean"), OTHERS, f"{name}: `others`"),
        input_axes=None if input_axes is None else dict(input_axes),
        scan_patterns=_patterns(raw.get("scan_patterns"), f"{name}: `scan_patterns`"),
        scan_axis=scan_axis,
        multi_device=_choice(raw.get("multi_device", "auto"), ("auto", True, False), f"{name}: `multi_device`"),
        layout=_choice(raw.get("layout", "auto"), LAYOUTS, f"{name}: `layout`"),
        dtype=_choice(raw.get("dtype", "float32"), COMPUTE_DTYPES, f"{name}: `dtype`"),
        out_dtype=None if out_dtype is None else _choice(out_dtype, OUT_DTYPES, f"{name}: `out_dtype`"),
        format=_choice(raw.get("format", "auto"), ("auto", *FORMATS), f"{name}: `format`"),
        out_format=_choice(raw.get("out_format", "auto"), ("auto", *FORMATS), f"{name}: `out_format`"),
        out_shard_size=parse_size(raw.get("out_shard_size", DEFAULT_SHARD_SIZE), f"{name}: `out_shard_size`"),
        grams=grams,
        source=None if source is None else Path(source),
        allow_download=allow_download,
        sources=sources,
        given={"base_model": _given(raw["base_model"]), "models": [_given(m) for m in models],
               **({} if grams is None else {"grams": _given(raw["grams"])})},
    )
    try:
        config.leaf_rules("torch")
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return config


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> MergeConfig:
    """Read and validate a YAML merge config; relative paths are taken from its directory."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); is it a YAML file?") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: invalid YAML ({exc})".replace("\n", " ")) from None
    return parse_config(raw, base_dir=path.parent, source=path, overrides=overrides)


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a config dtype name (bfloat16 via ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
