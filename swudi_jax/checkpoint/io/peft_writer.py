"""One PEFT LoRA adapter written from given factors: ``adapter_config.json`` and
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` lays them out (PEFT 0.21).

A module's update is stored as ΔW = B A (B out × R, A R × in) under
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``; with ``fan_in_fan_out``
(GPT-2's Conv1D, weight (in, out)) ΔW = (B A)ᵀ; an embedding's (vocab × dim) update is
``lora_embedding_A`` (R × vocab) and ``lora_embedding_B`` (dim × R), ΔW = (B A)ᵀ. Callers hand
the factors in the orientation of the stored tensor, ``ΔW = Bs As``; this module transposes
them where PEFT's form asks.

Scaling is 1 for every module: the config's ``r`` is the largest rank and ``lora_alpha`` equals
it; each other module gets its rank in ``rank_pattern`` and the same number in
``alpha_pattern`` (keys are the full module names, regex-escaped: PEFT matches a pattern
``p`` as ``(.*\\.)?(p)$``), ``use_rslora`` is off, so PEFT's α/r is 1 everywhere and the
update is exactly the factors' product. ``target_modules`` lists the full module names.
Whole tensors (``modules_to_save``) are stored under ``base_model.model.<tensor>`` and their
modules listed in ``modules_to_save``, which is how PEFT saves and reloads them.

The folder is one the caller has made for the output (the pipeline's temporary folder); this
module knows nothing of the maths.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swudi_jax.checkpoint.io.peft import CONFIG_NAME, PREFIX, SAFETENSORS_NAME
from swudi_jax.checkpoint.io.reader import ShapeDtype, naming_file
from swudi_jax.checkpoint.io.safetensors_io import SafetensorsWriter


@dataclass(frozen=True)
class AdapterModule:
    """One module of the written adapter: its rank and the (rows, cols) of the tensor it updates."""

    rank: int
    shape: tuple[int, int]
    embedding: bool = False


def factor_keys(module: str, embedding: bool) -> tuple[str, str]:
    """The (A, B) tensor names PEFT saves for ``module``."""
    if embedding:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def _transposed(spec: AdapterModule, fan_in_fan_out: bool) -> bool:
    return spec.embedding or fan_in_fan_out


def _factor_entries(module: str, spec: AdapterModule, fan_in_fan_out: bool, dtype) -> dict[str, ShapeDtype]:
    rows, cols = spec.shape
    a_key, b_key = factor_keys(module, spec.embedding)
    if _transposed(spec, fan_in_fan_out):  # ΔW = (B A)ᵀ: A (R × rows), B (cols × R)
        return {a_key: ((spec.rank, rows), dtype), b_key: ((cols, spec.rank), dtype)}
    return {a_key: ((spec.rank, cols), dtype), b_key: ((rows, spec.rank), dtype)}


def adapter_config(modules: Mapping[str, AdapterModule], modules_to_save: list[str], *, fan_in_fan_out: bool,
                   task_type: str | None, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` content: every module's scaling α/r = 1 (see the module docstring)."""
    top = max((m.rank for m in modules.values()), default=1)
    pattern = {re.escape(name): m.rank for name, m in modules.items() if m.rank != top}
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
        "target_modules": sorted(modules), "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out, "lora_dropout": 0.0, "bias": "none", "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    }


class AdapterWriter:
    """Streams an adapter's tensors into ``folder/adapter_model.safetensors``; ``close()`` writes
    the config once every tensor is in.

    Args:
      folder: an existing folder of the caller's (the output being built).
      modules: {module name: :class:`AdapterModule`}, the LoRA-updated modules.
      tensors: {tensor name (base naming): (shape, dtype)}, whole tensors (``modules_to_save``).
      dtype: the factors' dtype.
      fan_in_fan_out, task_type, base_model_name_or_path: written to the config.
    """

    def __init__(self, folder: str | os.PathLike, modules: Mapping[str, AdapterModule],
                 tensors: Mapping[str, ShapeDtype], dtype, *, fan_in_fan_out: bool = False,
                 task_type: str | None = None, base_model_name_or_path: str | None = None):
        self.folder = Path(folder)
        self.modules, self.fan_in_fan_out = dict(modules), fan_in_fan_out
        dtype = np.dtype(dtype)
        entries: dict[str, ShapeDtype] = {}
        for name, spec in self.modules.items():
            entries.update(_factor_entries(name, spec, fan_in_fan_out, dtype))
        entries.update({PREFIX + name: (tuple(shape), np.dtype(d)) for name, (shape, d) in tensors.items()})
        saved = sorted({name.rsplit(".", 1)[0] for name in tensors})
        self.config = adapter_config(self.modules, saved, fan_in_fan_out=fan_in_fan_out, task_type=task_type,
                                     base_model_name_or_path=base_model_name_or_path)
        self.path = self.folder / SAFETENSORS_NAME
        self._entries = entries
        self._writer = SafetensorsWriter(self.path, entries, metadata={"format": "pt"})

    def write_factors(self, module: str, b: np.ndarray, a: np.ndarray) -> None:
        """Write ``module``'s update ΔW = b a (b rows × R, a R × cols, the stored tensor's orientation)."""
        spec = self.modules[module]
        a_key, b_key = factor_keys(module, spec.embedding)
        if _transposed(spec, self.fan_in_fan_out):
            a, b = np.asarray(b).T, np.asarray(a).T
        with naming_file(self.path):
            for key, value in ((a_key, a), (b_key, b)):
                self._writer.write(key, np.ascontiguousarray(np.asarray(value).astype(self._entries[key][1])))

    def write_tensor(self, name: str, value: np.ndarray) -> None:
        """Write a whole tensor (a ``modules_to_save`` module's) under its base name."""
        key = PREFIX + name
        with naming_file(self.path):
            self._writer.write(key, np.asarray(value).astype(self._entries[key][1]))

    def close(self) -> None:
        with naming_file(self.path):
            self._writer.close()
        target = self.folder / CONFIG_NAME
        with naming_file(target):
            target.write_text(json.dumps(self.config, indent=2) + "\n")

    def abort(self) -> None:
        self._writer.abort()


__all__ = ["AdapterModule", "AdapterWriter", "adapter_config", "factor_keys"]
