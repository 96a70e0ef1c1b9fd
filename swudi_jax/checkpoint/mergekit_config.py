"""mergekit's config schema: per-model and per-tensor parameters, slices, tokenizer, chat template.

What a mergekit YAML says beyond one value per option, read as mergekit 0.1.5 reads it
(``mergekit/config.py``: ``ConfigReader.parameter`` and ``evaluate_setting``;
``mergekit/plan.py``: the layer fraction t), written here from its documentation:

- a parameter's value is looked up for each tensor, first in the model's own
  ``parameters`` (per-model options only), then in the global ``parameters``; the first
  lookup that gives a value wins, else the method's default;
- a value is a number (or bool/string), a **gradient** — a list of numbers, interpolated
  linearly at the tensor's layer fraction t: with s = t·(len − 1), i = ⌊s⌋,
  value = (1 − (s − i))·v[i] + (s − i)·v[min(i + 1, len − 1)] — or a list of
  **conditions** ``{filter: substring, value: setting}``, the first whose ``filter`` is a
  substring of the tensor name (or is ``*``, or has none) giving the value (itself possibly a gradient);
  a list of conditions none of which matches gives no value (the lookup goes on);
- t = i/(L − 1) for a tensor of transformer layer i of L (1 when L = 1); tensors outside
  the layers (embeddings, final norm, head) get t = 0, as mergekit's planner gives its
  "pre" and "post" weights (checked against mergekit 0.1.x's ``plan.py`` output).
  The layer index is read from the name (``….layers.7.…``, also ``h.7``, ``blocks.7``,
  ``layer.7``) and L is the number of distinct indices; a scanned (stacked) leaf gives each
  layer its index in the stack.

``slices:`` and ``modules:`` (which source layers make each output layer, per-slice
parameters and layer fractions) are read in :mod:`swudi_jax.checkpoint.slices`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from swudi_jax.checkpoint.io.side_files import copy_side_files, plan_side_files
from swudi_jax.methods.mergekit import MERGEKIT_METHODS

LAYER_RE = re.compile(r"(?:^|[./])(?:layers|layer|h|blocks|block)[./](\d+)(?=[./]|$)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
SCALAR_TYPES = (bool, int, float, str)
MERGEKIT_PARAMETERS = frozenset(name for spec in MERGEKIT_METHODS for name in spec.defaults)
"""The parameter names of mergekit's methods (``lambda`` as ``lam``): a config may carry those its
method has not (mergekit reads the ones its method declares and ignores the rest; its schema
likewise ignores top-level keys it does not know)."""


class SettingError(ValueError):
    """A parameter value mergekit's schema does not allow; the message names the parameter."""


def check_setting(value: Any, where: str) -> None:
    """A parameter value in mergekit's schema: scalar, gradient, or list of conditions."""
    if value is None or isinstance(value, SCALAR_TYPES):
        return
    if isinstance(value, list):
        if not value:
            raise SettingError(f"{where}: an empty list is no value")
        if all(isinstance(v, SCALAR_TYPES) for v in value):
            return
        for i, cond in enumerate(value):
            if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise SettingError(f"{where}[{i}]: a list of conditions takes mappings with `value` and an optional "
                                   f"`filter` (a substring of tensor names), got {cond!r}")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise SettingError(f"{where}[{i}].filter must be a string, got {cond['filter']!r}")
            check_setting(cond["value"], f"{where}[{i}].value")
        return
    raise SettingError(f"{where}: a value, a gradient (list of numbers) or a list of {{filter, value}} conditions, "
                       f"got {value!r}")


def is_plain(value: Any) -> bool:
    """A setting that is the same for every tensor."""
    return value is None or isinstance(value, SCALAR_TYPES)


def evaluate_setting(tensor_name: str, setting: Any, t: float) -> Any:
    """The value of a mergekit parameter setting for one tensor at layer fraction ``t`` (None: no value)."""
    if setting is None or isinstance(setting, SCALAR_TYPES):
        return setting
    if all(isinstance(v, (int, float)) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(np.floor(scaled))
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(isinstance(v, SCALAR_TYPES) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        if not cond.get("filter") or cond["filter"] == "*" or cond["filter"] in tensor_name:
            return evaluate_setting(tensor_name, cond["value"], t)
    return None


def layer_index(path: str) -> int | None:
    """The transformer layer a tensor name belongs to (the last ``layers.N`` in it), or None."""
    found = LAYER_RE.findall(path)
    return int(found[-1]) if found else None


def layer_fractions(paths: Sequence[str]) -> Callable[[str, int | None, int], float]:
    """``fraction(path, layer, layers)``: mergekit's t for a tensor (see the module docstring)."""
    indices = sorted({i for i in (layer_index(p) for p in paths) if i is not None})
    position = {index: k for k, index in enumerate(indices)}
    count = len(indices)

    def fraction(path: str, layer: int | None, layers: int) -> float:
        if layer is not None and layers > 1:
            return layer / (layers - 1)
        index = layer_index(path)
        if index is None:
            return 0.0
        return position[index] / (count - 1) if count > 1 else 1.0

    return fraction


class TensorParameters:
    """The per-tensor resolver of a method's varying options (:data:`swudi_jax.model.merger.TensorOptions`).

    Args:
      per_expert: the method's per-expert option names; tensor_options: its scalar varying ones.
      model_settings: per model (in expert order), its own ``parameters`` mapping.
      global_settings: the global ``parameters`` mapping (varying options only).
      paths: every tensor name, for the layer count. layers: {path: stacked layer count}.
      defaults: the method's resolved options (the value when no setting gives one).
    """

    def __init__(self, per_expert: Sequence[str], tensor_options: Sequence[str],
                 model_settings: Sequence[Mapping[str, Any]], global_settings: Mapping[str, Any],
                 paths: Sequence[str], layers: Mapping[str, int], defaults: Mapping[str, Any]):
        self.per_expert = tuple(per_expert)
        self.tensor_options = tuple(o for o in tensor_options if o not in self.per_expert)
        self.model_settings = [dict(m) for m in model_settings]
        self.global_settings = dict(global_settings)
        self.layers = dict(layers)
        self.defaults = dict(defaults)
        self.fraction = layer_fractions(paths)

    def _lookup(self, name: str, path: str, t: float, model: Mapping[str, Any] | None) -> Any:
        for source in ((model,) if model is not None else ()) + (self.global_settings,):
            if name in source:
                value = evaluate_setting(path, source[name], t)
                if value is not None:
                    return value
        return self.defaults.get(name)

    def __call__(self, path: str, layer: int | None) -> dict[str, Any]:
        t = self.fraction(path, layer, self.layers.get(path, 1))
        out: dict[str, Any] = {}
        for name in self.per_expert:
            values = [self._lookup(name, path, t, m) for m in self.model_settings]
            if any(v is None for v in values):
                who = [i for i, v in enumerate(values) if v is None]
                raise ValueError(f"tensor {path!r}: parameter {name!r} has no value for model(s) {who} "
                                 "(give it per model or globally)")
            out[name] = np.asarray(values, np.float64)
        for name in self.tensor_options:
            value = self._lookup(name, path, t, None)
            if value is None:
                raise ValueError(f"tensor {path!r}: parameter {name!r} has no value (mergekit has no default for it)")
            out[name] = value
        return out


# ----------------------------------------------------------------------------- tokenizer, chat template


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files of a model directory."""
    if not directory.is_dir():
        return []
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def copy_tokenizer(source: Path, out: Path, where: str) -> list[str]:
    """Replace the tokenizer files in ``out`` by ``source``'s (a model folder), each checked to
    resolve inside that folder (:mod:`swudi_jax.checkpoint.io.side_files`)."""
    files = [f for f in plan_side_files(source) if f.relative in TOKENIZER_FILES]
    if not files:
        raise ValueError(f"{where}: {source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    return copy_side_files(source, out, files)


def _template_of(directory: Path) -> str | None:
    files = [f for f in plan_side_files(directory) if f.relative == "tokenizer_config.json"]
    if not files:
        return None
    try:
        value = json.loads(files[0].source.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def is_template_text(value: str) -> bool:
    """A chat_template given as Jinja text rather than a template name."""
    return "{{" in value or "{%" in value


def resolve_chat_template(value: str, models: Sequence[Path], where: str) -> str:
    """The template text mergekit's ``chat_template`` names: Jinja text as given, or "auto":
    the template most of the input models' tokenizer_config.json carry.

    Raises:
      ValueError for a built-in template name (mergekit ships those files; they are not
      bundled here, and nothing is downloaded) or "auto" with no template among the models.
    """
    if is_template_text(value):
        return value
    if value == "auto":
        found = Counter(t for t in (_template_of(m) for m in models) if t is not None)
        if not found:
            raise ValueError(f"{where}: 'auto' found no chat_template in the models' tokenizer_config.json")
        return found.most_common(1)[0][0]
    raise ValueError(f"{where}: {value!r} names one of mergekit's bundled templates, which are not shipped here "
                     "(nothing is downloaded): paste the Jinja template text, or use 'auto' to take the models' own")


def write_chat_template(out: Path, template: str) -> None:
    """Set ``chat_template`` in ``out``'s tokenizer_config.json (created when absent)."""
    config = out / "tokenizer_config.json"
    content = json.loads(config.read_text()) if config.is_file() else {}
    content["chat_template"] = template
    config.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def set_torch_dtype(out: Path, dtype: str) -> bool:
    """Set ``torch_dtype`` (and ``dtype``, transformers ≥ 4.56's name, when present) in ``out``'s config.json."""
    config = out / "config.json"
    if not config.is_file():
        return False
    try:
        content = json.loads(config.read_text())
    except json.JSONDecodeError:
        warnings.warn(f"{config}: not valid JSON; torch_dtype left as it was", stacklevel=2)
        return False
    if not isinstance(content, dict):
        return False
    content["torch_dtype"] = dtype
    if "dtype" in content:
        content["dtype"] = dtype
    config.write_text(json.dumps(content, indent=2) + "\n")
    return True


__all__ = [
    "MERGEKIT_PARAMETERS",
    "SettingError",
    "TensorParameters",
    "check_setting",
    "copy_tokenizer",
    "evaluate_setting",
    "is_plain",
    "layer_fractions",
    "layer_index",
    "resolve_chat_template",
    "set_torch_dtype",
    "tokenizer_files",
    "write_chat_template",
]
