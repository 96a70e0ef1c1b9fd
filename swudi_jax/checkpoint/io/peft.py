"""PEFT LoRA adapters read as dense experts: each tensor is the base's plus its LoRA update.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
``adapter_model.bin``, read only when torch is importable). For a module with factors
``A`` (r × in, ``lora_A``) and ``B`` (out × r, ``lora_B``) the update of its weight is

    ΔW = s · B A,          s = lora_alpha / r           (LoRA, Hu et al., ICLR 2022)
                           s = lora_alpha / √r          (rsLoRA, Kalajdzievski 2023, ``use_rslora``)

with ``r`` and ``lora_alpha`` taken per module from ``rank_pattern`` / ``alpha_pattern`` when a
pattern matches the module name (first match, as PEFT does), else the global ``r`` and
``lora_alpha``. ``fan_in_fan_out`` (GPT-2's Conv1D, weight stored (in, out)) stores ΔW
transposed: ``s · (B A)ᵀ``. Embeddings (``lora_embedding_A`` r × vocab, ``lora_embedding_B``
dim × r) get ``s · (B A)ᵀ`` (vocab × dim). Other tensors in the file (``modules_to_save``,
trained biases) replace the base's tensor of the same name.

Names follow PEFT's saved form: ``base_model.model.<module>.lora_A.weight`` updates the base's
``<module>.weight``. Every tensor the adapter does not touch reads as the base's, so its task
vector is zero.

:class:`LoraReader` presents base + ΔW lazily: ΔW of a tensor is formed only when that tensor
is read (one group at a time in the streamed merge), so the pipeline merges adapters as it
merges any dense expert. The dense expert is rounded to the base tensor's dtype, as a merged
and saved PEFT model would be. Its :attr:`LoraReader.updates` (the factors, per tensor) and
:attr:`LoraReader.replaced` let the pipeline merge from the factors instead
(:mod:`swudi_jax.checkpoint.lora_factors`).

Every file is read through :func:`swudi_jax.checkpoint.io.confine.open_file`: an
``adapter_config.json`` or weights file that is a link out of the adapter folder is refused
before anything of it is read (so no error message can echo it).

Refused, naming the file and the tensor: a PEFT type other than LoRA, DoRA (``use_dora``),
``lora_bias``, a factor without its partner, A and B whose ranks disagree, a rank that is not
the config's ``r`` (or its ``rank_pattern``), a factor of more than 2 dimensions (conv LoRA),
a module outside ``target_modules``, a target the base does not have, and a ΔW whose shape is
not the base tensor's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from swudi_jax.checkpoint.io import confine
from swudi_jax.checkpoint.io.reader import BaseReader, CheckpointError, CheckpointReader

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight")
_EMBEDDING = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.[^.]+)?")


def is_adapter(path: str | os.PathLike) -> bool:
    """A folder holding a PEFT ``adapter_config.json``."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern equal to the module name or matching a
    dotted tail of it as a regular expression."""
    for pattern, value in patterns.items():
        if module == pattern or re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


@dataclass(frozen=True)
class LoraConfig:
    """The parts of ``adapter_config.json`` that decide ΔW (see the module docstring)."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def rank(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def scaling(self, module: str) -> float:
        """s = alpha / r, or alpha / √r with rsLoRA, for one module."""
        r = self.rank(module)
        alpha = float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` covers ``module`` (a list: the name or its last dotted
        parts; a string: a regular expression matching the whole name; PEFT's rules)."""
        t = self.target_modules
        if t is None or t == "all-linear":
            return True
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == name or module.endswith("." + name) for name in t)


def read_config(adapter_dir: Path) -> LoraConfig:
    """Parse and check ``adapter_config.json``; ValueError naming the file and the key."""
    path = Path(adapter_dir) / CONFIG_NAME
    text = confine.read_file(path, confine.model_root(adapter_dir), "adapter config")
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable adapter config ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    kind = str(raw.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LoRA adapters)")
    for flag, what in (("use_dora", "DoRA (use_dora)"), ("lora_bias", "lora_bias")):
        if raw.get(flag):
            raise CheckpointError(f"{path}: {what} adapters are not supported; only plain LoRA updates s·B·A")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise CheckpointError(f"{path}: `r` must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{path}: `lora_alpha` must be a finite number, got {alpha!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise CheckpointError(f"{path}: `target_modules` must be a list of names or a regex, got {targets!r}")
        targets = tuple(targets)
    elif targets is not None and not isinstance(targets, str):
        raise CheckpointError(f"{path}: `target_modules` must be a list of names or a regex, got {targets!r}")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                                  for v in value.values()):
            raise CheckpointError(f"{path}: `{key}` must map module patterns to positive numbers, got {value!r}")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise CheckpointError(f"{path}: `{key}` pattern {pattern!r} is not a regular expression ({exc})") from None
        patterns[key] = value
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise CheckpointError(f"{path}: `target_modules` {targets!r} is not a regular expression ({exc})") from None
    return LoraConfig(path=path, r=r, lora_alpha=float(alpha), use_rslora=bool(raw.get("use_rslora", False)),
                      fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)), target_modules=targets,
                      rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
                      base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"))


def _load_bin(file: Path, root: Path) -> dict[str, np.ndarray]:
    with confine.open_file(file, root, "adapter weights") as f:  # confined before torch is even looked for
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{file}: a pickled (.bin) adapter needs torch to read; install torch or save the "
                                  "adapter as safetensors (PeftModel.save_pretrained(..., safe_serialization=True))") from None
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for bad pickles
            raise CheckpointError(f"{file}: unreadable adapter weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file}: expected a state dict of tensors, got {type(state).__name__}")
    out = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{file}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            out[key] = tensor.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[key] = tensor.numpy()
    return out


def load_weights(adapter_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The adapter's tensors (small: read whole) and the file they came from."""
    st, pt = Path(adapter_dir) / SAFETENSORS_NAME, Path(adapter_dir) / BIN_NAME
    if st.is_file() or st.is_symlink():
        from swudi_jax.checkpoint.io.safetensors_io import SafetensorsReader

        with SafetensorsReader(st) as reader:
            return st, reader.read_many(reader.keys())
    if pt.is_file() or pt.is_symlink():
        return pt, _load_bin(pt, confine.model_root(adapter_dir))
    raise CheckpointError(f"{adapter_dir}: PEFT adapter without weights ({SAFETENSORS_NAME} or {BIN_NAME})")


@dataclass(frozen=True)
class LoraUpdate:
    """One module's factors: ΔW = scaling · B A, transposed when ``transpose`` (``fan_in_fan_out``
    or an embedding, whose update is ``lora_embedding_A/B``)."""

    a: np.ndarray
    b: np.ndarray
    scaling: float
    transpose: bool
    embedding: bool = False

    def delta(self, dtype=np.float32) -> np.ndarray:
        d = self.scaling * (self.b.astype(dtype) @ self.a.astype(dtype))
        return d.T if self.transpose else d


def _compute_dtype(dtype: np.dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


class LoraReader(BaseReader):
    """A dense expert: ``base`` with an adapter's LoRA updates added as each tensor is read.

    Args:
      base: a reader over the model the adapter was trained on (closed with this reader).
      adapter_dir: the PEFT adapter folder.
    Raises:
      CheckpointError naming the adapter file and the tensor when the adapter is malformed or
      does not fit the base (see the module docstring).
    """

    def __init__(self, base: CheckpointReader, adapter_dir: str | os.PathLike):
        super().__init__(adapter_dir)
        self._base = base
        self.format = base.format
        try:
            self._init(base)
        except BaseException:
            base.close()
            raise

    def _init(self, base: CheckpointReader) -> None:
        self.config = read_config(self.path)
        file, tensors = load_weights(self.path)
        self.file = file
        self._entries = {key: base.shape_dtype(key) for key in base.keys()}
        factors: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
        self.replaced: dict[str, np.ndarray] = {}
        for key, value in tensors.items():
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{file}: tensor {key!r} does not start with {PREFIX!r} (not a PEFT LoRA state dict)")
            name = key[len(PREFIX):]
            if "lora_magnitude_vector" in name:
                raise CheckpointError(f"{file}: tensor {key!r} is a DoRA magnitude; DoRA adapters are not supported")
            match = _FACTOR.fullmatch(name) or _EMBEDDING.fullmatch(name)
            if match:
                kind = "linear" if match.re is _FACTOR else "embedding"
                factors.setdefault((match.group("module"), kind), {})[match.group("which")] = (key, value)
            elif ".lora_" in name:
                raise CheckpointError(f"{file}: tensor {key!r} is a LoRA tensor of an unsupported kind")
            else:
                self._replacement(file, key, name, value)
        self.updates: dict[str, LoraUpdate] = {}
        for (module, kind), pair in factors.items():
            self.updates[module + ".weight"] = self._update(file, module, kind, pair)
        if not self.updates and not self.replaced:
            raise CheckpointError(f"{file}: the adapter holds no LoRA factors")

    def _replacement(self, file: Path, key: str, name: str, value: np.ndarray) -> None:
        if name not in self._entries:
            raise CheckpointError(f"{file}: tensor {key!r} replaces {name!r}, which the base {self._base.path} does not have")
        shape = self._entries[name][0]
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(value.shape)}, the base's {name!r} has {list(shape)}")
        self.replaced[name] = value

    def _update(self, file: Path, module: str, kind: str, pair: dict[str, tuple[str, np.ndarray]]) -> LoraUpdate:
        label = "lora_embedding_" if kind == "embedding" else "lora_"
        for which, other in (("A", "B"), ("B", "A")):
            if which not in pair:
                raise CheckpointError(f"{file}: {module}: {pair[other][0]!r} has no matching {label}{which} tensor")
        (a_key, a), (b_key, b) = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2:
            raise CheckpointError(f"{file}: {a_key!r} is {list(a.shape)} and {b_key!r} is {list(b.shape)}; only 2-D "
                                  "(linear, Conv1D, embedding) LoRA factors are supported")
        if b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{file}: rank mismatch: {a_key!r} {list(a.shape)} has rank {a.shape[0]} but "
                                  f"{b_key!r} {list(b.shape)} has {b.shape[1]} columns")
        config = self.config
        if a.shape[0] != config.rank(module):
            raise CheckpointError(f"{file}: {a_key!r} has rank {a.shape[0]}, but {config.path.name} gives r = "
                                  f"{config.rank(module)} for {module!r}")
        target = module + ".weight"
        if target not in self._entries:
            raise CheckpointError(f"{file}: {a_key!r} targets {target!r}, which the base {self._base.path} does not have")
        if not config.targets(module):
            t = config.target_modules
            raise CheckpointError(f"{file}: {a_key!r} updates {module!r}, which target_modules "
                                  f"{list(t) if isinstance(t, tuple) else t!r} of {config.path.name} does not cover")
        transpose = kind == "embedding" or config.fan_in_fan_out
        out_shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        shape = self._entries[target][0]
        if tuple(shape) != out_shape:
            raise CheckpointError(f"{file}: {a_key!r} {list(a.shape)} and {b_key!r} {list(b.shape)} give ΔW of shape "
                                  f"{list(out_shape)}, but the base's {target!r} is {list(shape)}"
                                  + ("" if kind == "embedding" else f" (fan_in_fan_out={config.fan_in_fan_out})"))
        if target in self.replaced:
            raise CheckpointError(f"{file}: {target!r} is both replaced and LoRA-updated by the adapter")
        return LoraUpdate(a=a, b=b, scaling=config.scaling(module), transpose=transpose, embedding=kind == "embedding")

    @property
    def metadata(self) -> dict[str, str]:
        return getattr(self._base, "metadata", {}) or {}

    def read_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(keys)
        for key in keys:
            self._check_key(key)
        from_base = [k for k in keys if k not in self.replaced]
        out = self._base.read_many(from_base)
        for key in keys:
            if key in self.replaced:
                out[key] = np.asarray(self.replaced[key]).astype(self._entries[key][1], copy=False)
            elif key in self.updates:
                base = out[key]
                dtype = _compute_dtype(base.dtype)
                out[key] = (base.astype(dtype) + self.updates[key].delta(dtype)).astype(base.dtype)
        return {key: out[key] for key in keys}

    def close(self) -> None:
        self._base.close()


__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "PREFIX",
    "SAFETENSORS_NAME",
    "LoraConfig",
    "LoraReader",
    "LoraUpdate",
    "is_adapter",
    "load_weights",
    "read_config",
]
