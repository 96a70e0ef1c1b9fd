"""Merge checkpoints on disk, streamed: one group of tensors from all models in memory at a time.

The steps, each finished before the next begins:

1. the config is validated (:mod:`swudi_jax.checkpoint.config`) and every checkpoint is opened (headers
   and metadata only); key sets, shapes and dtypes are compared across base and experts;
2. every tensor is classified and grouped (:func:`swudi_jax.model.merger.plan_tree`,
   :func:`swudi_jax.model.batching.compile_groups`; a group's stacked bytes stay under
   ``max_group_size``);
3. in a temporary directory next to OUT, group by group: the group's tensors are read from
   the base and every expert, checked for NaN/Inf, merged in one compiled call
   (:func:`swudi_jax.model.merger.merge_group`) and streamed into the output checkpoint;
4. base's non-weight files (config.json, tokenizer files, ...), the resolved config and a
   model card are added, and the directory is renamed to OUT.

Any failure or interrupt before the rename removes the temporary directory: OUT is either
absent (or, with ``force``, its previous content) or complete. Inputs are only read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.config import MergeConfig, load_config, numpy_dtype
from swudi_jax.checkpoint.io.atomic import atomic_directory, check_output_free
from swudi_jax.checkpoint.io.sources import ModelSource
from swudi_jax.maths.validation import non_finite
from swudi_jax.methods import registry
from swudi_jax.model.flat import mismatch
from swudi_jax.model.layout import LeafPlan, infer_layout
from swudi_jax.model.batching import compile_groups, padded_sizes
from swudi_jax.model.merger import DEFAULT_MAX_GROUP_BYTES, merge_group, prepare_options
from swudi_jax.checkpoint.stream import run_overlapped, run_sequential

PAPER = "https://arxiv.org/abs/2606.07289"
CONFIG_NAME = "merge_config.yaml"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".npz", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "flax_model.msgpack.index.json")


@dataclass(frozen=True)
class MergePlan:
    """Everything decided before compute: the config, each tensor's plan and the groups."""

    config: MergeConfig
    layout: str
    in_format: str
    out_format: str
    plans: tuple[LeafPlan, ...]
    groups: tuple[tuple[LeafPlan, ...], ...]
    out_dtypes: Mapping[str, np.dtype]

    def describe(self) -> str:
        """A table: each tensor, its shape and dtype, its kind, what merges it, and its group."""
        method = self.config.merge_method
        is_elementwise = registry.get_method(method).kind == "elementwise"
        rows = [("tensor", "shape", "dtype", "kind", "method", "group")]
        for g, group in enumerate(self.groups):
            for p in group:
                how = {"linear": method, "mean": method if is_elementwise else "mean",
                       "keep": "base", "passthrough": "copy"}[p.kind]
                rows.append((p.path, "x".join(map(str, p.shape)) or "scalar", str(np.dtype(p.dtype)), p.kind, how, str(g)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        counts = {k: sum(p.kind == k for p in self.plans) for k in ("linear", "mean", "keep", "passthrough")}
        summary = (f"{len(self.plans)} tensors in {len(self.groups)} groups "
                   f"({', '.join(f'{v} {k}' for k, v in counts.items())}); method {method}, layout {self.layout}, "
                   f"{self.in_format} -> {self.out_format}, largest group {self.largest_group_bytes():,} bytes "
                   f"x {len(self.config.models) + 1} models")
        return "\n".join(lines + ["", summary])

    def largest_group_bytes(self) -> int:
        return max((sum(p.nbytes for p in g) for g in self.groups), default=0)


def _open(path, fmt: str, who: str) -> ckio.CheckpointReader:
    """A reader over a path or a resolved :class:`~swudi_jax.checkpoint.io.sources.ModelSource` (Hub snapshot,
    PEFT adapter over its base, orbax step/item)."""
    try:
        return path.open(fmt) if isinstance(path, ModelSource) else ckio.open_checkpoint(path, fmt)
    except ckio.CheckpointError as exc:
        raise ckio.CheckpointError(f"{who}: {exc}") from None


def _signature(reader: ckio.CheckpointReader) -> dict[str, tuple]:
    return {key: reader.shape_dtype(key) for key in reader.keys()}


def _check_same_tensors(base: ckio.CheckpointReader, experts: Sequence[ckio.CheckpointReader]) -> None:
    want = _signature(base)
    for expert in experts:
        found = mismatch(want, _signature(expert))
        if found is None:
            continue
        if found.kind == "paths":
            parts = [f"missing {list(found.missing[:5])}" if found.missing else "",
                     f"extra {list(found.extra[:5])}" if found.extra else ""]
            raise ValueError(f"{expert.path}: tensor names differ from the base {base.path}: "
                             + "; ".join(p for p in parts if p))
        got, base_value = (list(found.got), list(found.want)) if found.kind == "shape" else (found.got, found.want)
        raise ValueError(f"{expert.path}: tensor {found.path!r} has {found.kind} {got}, the base has {base_value}")


def _check_grams(config: MergeConfig, plans: Sequence[LeafPlan], grams: ckio.CheckpointReader | None) -> None:
    if registry.get_method(config.merge_method).kind != "data":
        return
    n = len(config.models)
    for p in plans:
        if p.kind != "linear":
            continue
        want = (n, p.maths_shape[1], p.maths_shape[1]) if p.layers == 1 else (p.layers, n, p.maths_shape[1], p.maths_shape[1])
        if p.path not in grams.keys():
            raise ValueError(f"{grams.path}: no input Grams for linear weight {p.path!r} (expected shape {list(want)})")
        if grams.shape_dtype(p.path)[0] != want:
            raise ValueError(f"{grams.path}: Grams of {p.path!r} have shape {list(grams.shape_dtype(p.path)[0])}, "
                             f"expected {list(want)}")


def _read_group(reader: ckio.CheckpointReader, keys: Sequence[str]) -> dict[str, np.ndarray]:
    arrays = reader.read_many(keys)
    for key, array in arrays.items():
        found = non_finite(array)
        if found is not None:
            raise ValueError(f"{reader.path}: tensor {key!r} contains {found[0]} NaN/Inf value(s); "
                             f"first at index {found[1]}")
    return arrays


@contextlib.contextmanager
def _opened(config: MergeConfig) -> Iterator[tuple[ckio.CheckpointReader, list[ckio.CheckpointReader], Any]]:
    readers: list[ckio.CheckpointReader] = []
    try:
        sources = config.sources or (config.base_model, *config.models)
        readers.append(_open(sources[0], config.format, "base_model"))
        for i, path in enumerate(sources[1:]):
            readers.append(_open(path, config.format, f"models[{i}]"))
        grams = None
        if config.grams is not None:
            grams = _open(config.grams, "auto", "grams")
            readers.append(grams)
        yield readers[0], readers[1:1 + len(config.models)], grams
    finally:
        for reader in readers:
            reader.close()


def plan_merge(config: MergeConfig, base: ckio.CheckpointReader, experts: Sequence[ckio.CheckpointReader],
               grams: ckio.CheckpointReader | None = None, *, max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES) -> MergePlan:
    """Check the checkpoints against each other and decide every tensor's fate (no tensor data is read)."""
    _check_same_tensors(base, experts)
    layout = config.layout
    if layout == "auto":  # from the leaf names (kernel: Flax, weight: torch), else from the format
        try:
            layout = infer_layout(base.keys())
        except ValueError:
            layout = "torch" if base.format == "safetensors" else "flax"
    out_format = base.format if config.out_format == "auto" else config.out_format
    plans = config.leaf_rules(layout).plan_tree(_signature(base))
    _check_grams(config, plans, grams)
    elementwise = registry.get_method(config.merge_method).kind == "elementwise"
    groups = compile_groups(plans, max_group_bytes, copies=len(experts) + 2, elementwise=elementwise)
    out_dtypes = {}
    for p in plans:
        floating = p.kind != "passthrough"
        out_dtypes[p.path] = numpy_dtype(config.out_dtype) if (config.out_dtype and floating) else np.dtype(p.dtype)
    return MergePlan(config, layout, base.format, out_format, tuple(plans), tuple(tuple(g) for g in groups), out_dtypes)


def _compute(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    if dtype != "float64":
        return arrays
    return {k: a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16" else a
            for k, a in arrays.items()}


def _model_chunks(plan: MergePlan, base, experts, progress: bool):
    """The merged tensors' task-vector stacks (N, ...) in float32, read group by group from disk."""
    merged = [[p for p in g if p.kind in ("linear", "mean")] for g in plan.groups]

    def chunks():
        for group in _progress([g for g in merged if g], progress, "whole-model pass"):
            keys = [p.path for p in group]
            base_arrays = _read_group(base, keys)
            expert_arrays = [_read_group(e, keys) for e in experts]
            for key in keys:
                b = base_arrays[key].astype(np.float32)
                yield np.stack([e[key].astype(np.float32) - b for e in expert_arrays])

    return chunks


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="group", file=sys.stderr, leave=False)


def _copy_side_files(base_path: Path, out: Path) -> list[str]:
    """Copy the base directory's non-weight files (config.json, tokenizer files, ...) to ``out``."""
    if not base_path.is_dir() or ckio.detect_format(base_path) != "safetensors":
        return []
    copied = []
    for item in sorted(base_path.iterdir()):
        if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and item.name not in WEIGHT_INDEXES \
                and item.name not in ("README.md", CONFIG_NAME) and not item.name.startswith("."):
            shutil.copy2(item, out / item.name)
            copied.append(item.name)
    return copied


def model_card(plan: MergePlan, scale: float) -> str:
    """README.md for the merged checkpoint: what was merged, how, and where the method comes from."""
    c = plan.config
    method = registry.get_method(c.merge_method)
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in c.to_dict()["parameters"].items()) or "| (none) | |"
    experts = "\n".join(f"  - `{p}`" for p in c.models)
    counts = {k: sum(p.kind == k for p in plan.plans) for k in ("linear", "mean", "keep", "passthrough")}
    return f"""---
tags: [merge, swudi_jax, {c.merge_method}]
---
# Merged model ({c.merge_method})

Made with swudi_jax `swudi-merge`: θ = θ0 + s · merge(τ1, …, τN),
τi = θi − θ0, with s = {scale:g}.

- **Base model:** `{c.base_model}`
- **Experts ({len(c.models)}):**
{experts}
- **Method:** `{c.merge_method}` ({method.kind}); source: {method.source}
- **Layout:** {plan.layout}; **tensors:** {counts['linear']} merged by the method as linear maps, {counts['mean']} by the
  {'method' if method.kind == 'elementwise' else 'mean task vector'}, {counts['keep']} kept from the base, {counts['passthrough']} non-float copied.
- **Format:** {plan.out_format}; **out dtype:** {c.out_dtype or 'as the base'}; **compute dtype:** {c.dtype}

| parameter | value |
|---|---|
{params}

The full resolved config is in `{CONFIG_NAME}` (re-run with `swudi-merge {CONFIG_NAME} OUT`).

SWUDI paper: arXiv 2606.07289, {PAPER}.
"""


def merge_checkpoints(config: MergeConfig | str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                      dry_run: bool = False, progress: bool = True,
                      max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES, overlap: bool = True,
                      timings: dict | None = None) -> Path:
    """Merge the checkpoints a config names into ``out``, streaming one tensor group at a time.

    Args:
      config: a :class:`MergeConfig` or the path of a YAML config.
      out: the output directory (absent or empty, unless ``force``).
      force: replace an existing ``out`` (only once the new one is complete).
      dry_run: validate everything and print the plan; nothing is read beyond headers, nothing written.
      progress: show a progress bar over tensor groups (stderr).
      max_group_bytes: cap on (N + 2) × a group's tensor bytes; one group is held at once, two
        with ``overlap``.
      overlap: read the next group and write the previous one while this one merges
        (:mod:`swudi_jax.checkpoint.stream`; same results as ``overlap=False``, at most 2 groups held).
      timings: if a dict, filled with the merge loop's busy seconds per stage and its wall time.
    Returns:
      ``out`` as a Path.
    Raises:
      ValueError (``ConfigError``, ``CheckpointError``) naming the file and tensor, before
      any output is in place.
    """
    config = config if isinstance(config, MergeConfig) else load_config(config)
    out = check_output_free(out, force=force)
    inputs = [p for s in config.sources for p in (s.path, s.adapter) if p is not None]
    for source in (config.base_model, *config.models, *inputs):
        if out.resolve() == source or source in out.resolve().parents or out.resolve() in source.parents:
            raise ValueError(f"output {out} overlaps the input checkpoint {source}")
    x64 = config.dtype == "float64"
    if x64:
        jax.config.update("jax_enable_x64", True)
    with _opened(config) as (base, experts, grams):
        plan = plan_merge(config, base, experts, grams, max_group_bytes=max_group_bytes)
        if dry_run:
            print(plan.describe())
            return out
        method = registry.get_method(config.merge_method)
        options = method.resolve(config.parameters)
        scale = config.scale if config.scale is not None else method.scale(options)
        options = prepare_options(method, options, _model_chunks(plan, base, experts, progress))
        metadata = getattr(base, "metadata", None) or None
        entries = {p.path: (p.shape, plan.out_dtypes[p.path]) for p in plan.plans}
        with atomic_directory(out, force=force) as tmp:
            target = ckio.weights_path(tmp, plan.out_format)
            writer = ckio.open_writer(target, plan.out_format, entries, shard_size=config.out_shard_size,
                                      metadata=metadata)
            try:
                sizes = padded_sizes(plan.groups, method.kind == "elementwise")

                def read(g):
                    keys = [p.path for p in plan.groups[g]]
                    group_grams = None
                    if grams is not None and plan.groups[g][0].kind == "linear":
                        group_grams = grams.read_many(keys)
                    return (_compute(_read_group(base, keys), config.dtype),
                            [_compute(_read_group(e, keys), config.dtype) for e in experts], group_grams)

                def compute(g, arrays):
                    return merge_group(list(plan.groups[g]), *arrays[:2], method, scale, options, arrays[2],
                                       config.multi_device, pad_to=sizes[g], host_output=True)

                def write(g, merged):
                    for key in (p.path for p in plan.groups[g]):
                        writer.write(key, np.asarray(merged[key]).astype(plan.out_dtypes[key], copy=False))

                loop = run_overlapped if overlap else run_sequential
                split = loop(range(len(plan.groups)), read, compute, write,
                             progress=lambda items: _progress(items, progress, "merging"))
                if timings is not None:
                    timings.update(split.as_dict())
            except BaseException:
                writer.abort()
                raise
            writer.close()
            _copy_side_files(config.base_model, tmp)
            (tmp / CONFIG_NAME).write_text(config.to_yaml())
            (tmp / "README.md").write_text(model_card(plan, scale))
    return out
