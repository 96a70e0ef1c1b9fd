"""Merge checkpoints on disk, streamed: one group of tensors from all models in memory at a time.

The steps, each finished before the next begins:

1. the config is validated (:mod:`swudi_jax.checkpoint.config`) and every checkpoint is opened (headers
   and metadata only); key sets, shapes and dtypes are compared across base and experts;
2. every tensor is classified and grouped (:func:`swudi_jax.model.merger.plan_tree`,
   :func:`swudi_jax.model.batching.compile_groups`; a group's stacked bytes stay under
   ``max_group_size``);
3. OUT is checked (:func:`swudi_jax.checkpoint.io.output.check_output_target`: never empty, ``.``,
   the working directory, a parent of the config or of an input), locked, and a temporary
   directory is made next to OUT (:class:`swudi_jax.checkpoint.io.output.OutputSlot`); the base's
   side files are checked (:mod:`swudi_jax.checkpoint.io.side_files`);
4. in that temporary directory, group by group, overlapped (:mod:`swudi_jax.checkpoint.stream`:
   the next group is read and the previous one written while this one merges): the group's
   tensors are read from the base and every expert, checked for NaN/Inf on the host, merged in
   one compiled call per shape group (:func:`swudi_jax.model.merger.merge_group`, chunks padded to
   one size), checked finite on the host in their output dtype
   (:func:`swudi_jax.checkpoint.output_checks.checked_outputs`: the compiled layer functions cannot
   raise on traced values, so this is where non-finite results are caught, naming the
   tensor and the method) and streamed into the output checkpoint by the write-behind thread;
5. the base's side files (an allow-list: config, tokenizer, sentence-transformers modules),
   the config (checkpoint paths as written in it) and a model card are added, and the
   directory is moved to OUT if OUT is still what the run saw at the start.

Every file read from a model folder resolves inside it (:mod:`swudi_jax.checkpoint.io.confine`). Any
failure or interrupt before the move removes the temporary directory: OUT is either absent
(or, with ``force``, its previous content) or complete. Inputs are only read.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint import mergekit_config as mk
from swudi_jax.checkpoint.config import MergeConfig, load_config, numpy_dtype, tensor_resolver
from swudi_jax.checkpoint.io.output import OutputSlot, check_output_target
from swudi_jax.checkpoint.io.reader import naming_file
from swudi_jax.checkpoint.io.side_files import plan_side_files
from swudi_jax.checkpoint.io.sources import ModelSource
from swudi_jax.checkpoint.merge_plan import MergePlan
from swudi_jax.checkpoint.output_checks import checked_outputs
from swudi_jax.checkpoint.output_files import CONFIG_NAME, write_beside
from swudi_jax.checkpoint.report_files import write_report
from swudi_jax.checkpoint.stream import run_overlapped, run_sequential
from swudi_jax.maths.linalg import is_floating
from swudi_jax.maths.validation import non_finite
from swudi_jax.model.batching import compile_groups, padded_sizes
from swudi_jax.model.flat import mismatch
from swudi_jax.model.layout import LeafPlan
from swudi_jax.model.merger import DEFAULT_MAX_GROUP_BYTES, chunk_plans, chunk_stack, merge_group, prepare
from swudi_jax.model.report import ReportCollector



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
    """Same names and shapes; dtypes equal unless both floating (a bf16 expert with a float32
    base is cast to the compute dtype, as mergekit does)."""
    want = _signature(base)
    for expert in experts:
        got_signature = _signature(expert)
        found = mismatch(want, got_signature, dtypes=False)
        if found is None:
            found = mismatch({k: v for k, v in want.items() if not (is_floating(v[1]) and is_floating(got_signature[k][1]))},
                             {k: v for k, v in got_signature.items()
                              if not (is_floating(v[1]) and is_floating(want[k][1]))})
        if found is None:
            continue
        if found.kind == "paths":
            parts = [f"missing {list(found.missing[:5])}" if found.missing else "",
                     f"extra {list(found.extra[:5])}" if found.extra else ""]
            raise ValueError(f"{expert.path}: tensor names differ from the base {base.path}: "
                             + "; ".join(p for p in parts if p))
        got, base_value = (list(found.got), list(found.want)) if found.kind == "shape" else (found.got, found.want)
        raise ValueError(f"{expert.path}: tensor {found.path!r} has {found.kind} {got}, the base has {base_value}")


def _check_grams(plans: Sequence[LeafPlan], grams: ckio.CheckpointReader, n: int, required: bool) -> None:
    """Every linear weight's Grams present (``required``, for data methods) or those present of the
    right shape and none for another tensor (``--score``'s calibration Grams)."""
    linear = [p for p in plans if p.kind == "linear"]
    for p in linear:
        want = (n, p.maths_shape[1], p.maths_shape[1]) if p.layers == 1 else (p.layers, n, p.maths_shape[1], p.maths_shape[1])
        if p.path not in grams.keys():
            if not required:
                continue
            raise ValueError(f"{grams.path}: no input Grams for linear weight {p.path!r} (expected shape {list(want)})")
        if grams.shape_dtype(p.path)[0] != want:
            raise ValueError(f"{grams.path}: Grams of {p.path!r} have shape {list(grams.shape_dtype(p.path)[0])}, "
                             f"expected {list(want)}")
    extra = sorted(set(grams.keys()) - {p.path for p in linear})
    if extra and not required:
        raise ValueError(f"{grams.path}: Grams for {extra[:5]}, which are not linear weights of the base "
                         f"(linear weights: {[p.path for p in linear][:3]}...)")


class _GramReader(Mapping):
    """A Grams checkpoint as the ``{path: (N, n, n)}`` mapping the report reads, tensor by tensor
    (each checked finite when read)."""

    def __init__(self, reader: ckio.CheckpointReader):
        self.reader = reader

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.reader.keys():
            raise KeyError(key)
        return _read_group(self.reader, [key])[key]

    def __iter__(self):
        return iter(self.reader.keys())

    def __len__(self) -> int:
        return len(self.reader.keys())


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
    # layout "auto": from the leaf names (kernel: Flax, weight: torch), else from the format
    rules = config.leaf_rules().for_paths(base.keys(), fallback="torch" if base.format == "safetensors" else "flax")
    out_format = base.format if config.out_format == "auto" else config.out_format
    plans, guesses = rules.plan_with_guesses(_signature(base))
    mk.check_layer_range(config.layer_range, base.keys(), f"config {config.source}: `slices`")
    if config.method.spec.kind == "data":
        _check_grams(plans, grams, len(config.models), required=True)
    elementwise = config.method.spec.kind == "elementwise"
    groups = compile_groups(plans, max_group_bytes, copies=len(experts) + 2, elementwise=elementwise)
    out_dtypes = {}
    for p in plans:
        floating = p.kind != "passthrough"
        out_dtypes[p.path] = numpy_dtype(config.out_dtype) if (config.out_dtype and floating) else np.dtype(p.dtype)
    return MergePlan(config, rules.layout, base.format, out_format, tuple(plans), tuple(tuple(g) for g in groups),
                     out_dtypes, guesses)


def plan_checkpoints(config: MergeConfig | str | os.PathLike, *,
                     max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES) -> MergePlan:
    """The plan :func:`merge_checkpoints` follows for ``config`` (what its ``dry_run`` prints):
    the checkpoints are opened (headers and metadata only), checked and planned, then closed."""
    config = config if isinstance(config, MergeConfig) else load_config(config)
    with _opened(config) as (base, experts, grams):
        return plan_merge(config, base, experts, grams, max_group_bytes=max_group_bytes)


def _compute(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Floating arrays cast to the compute dtype (mixed-dtype inputs meet in it); others as read."""
    target = numpy_dtype(dtype)
    return {k: a.astype(target, copy=False) if is_floating(a.dtype) else a for k, a in arrays.items()}


def _model_chunks(plan: MergePlan, base, experts, progress: bool):
    """``chunks(leaves)``: the selected tensors' task-vector stacks in float32, read group by
    group from disk (``leaves``: see :data:`~swudi_jax.methods.spec.CHUNK_LEAVES`)."""

    def chunks(leaves: str = "merged"):
        selected = [chunk_plans(g, leaves) for g in plan.groups]
        for group in _progress([g for g in selected if g], progress, "whole-model pass"):
            keys = [p.path for p in group]
            base_arrays = _read_group(base, keys)
            expert_arrays = [_read_group(e, keys) for e in experts]
            for leaf in group:
                b = base_arrays[leaf.path].astype(np.float32)
                yield chunk_stack(leaf, np.stack([e[leaf.path].astype(np.float32) - b for e in expert_arrays]), leaves)

    return chunks


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="group", file=sys.stderr, leave=False)


def _group_reader(plan: MergePlan, base, experts, grams, work: str, same_as_base: list[bool]):
    """``read(g)`` for the prefetch thread: group g's inputs read, checked finite on the host and
    cast to the compute dtype (and its Grams); notes in ``same_as_base`` which experts still equal the base."""

    def read(g):
        keys = [p.path for p in plan.groups[g]]
        base_arrays = _compute(_read_group(base, keys), work)
        expert_arrays = [_compute(_read_group(e, keys), work) for e in experts]
        for i, arrays in enumerate(expert_arrays):
            same_as_base[i] = same_as_base[i] and all(np.array_equal(arrays[k], base_arrays[k]) for k in keys)
        group_grams = None
        if grams is not None and plan.groups[g][0].kind == "linear":
            group_grams = _read_group(grams, keys)
        return base_arrays, expert_arrays, group_grams

    return read


def _shard_bytes(plan: MergePlan) -> int:
    """The output shard size in bytes (mergekit's "parameters" count times the widest out dtype)."""
    size = plan.config.out_shard_size
    if plan.config.out_shard_unit == "parameters":
        size *= max((np.dtype(d).itemsize for d in plan.out_dtypes.values()), default=4)
    return size


@contextlib.contextmanager
def _closing(writer, target: Path) -> Iterator[None]:
    """Close the weights writer after the loop, or abort it (its partial output removed) on any failure."""
    try:
        yield
    except BaseException:
        writer.abort()
        raise
    with naming_file(target):
        writer.close()


def _warn_zero_task_vectors(config: MergeConfig, same_as_base: Sequence[bool]) -> None:
    for i, same in enumerate(same_as_base):
        if same:
            warnings.warn(f"models[{i}] ({config.models[i]}) equals the base model in every tensor: its task "
                          "vector is zero", stacklevel=3)


def merge_checkpoints(config: MergeConfig | str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                      dry_run: bool = False, progress: bool = True,
                      max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES, copy_tokenizer: bool = True,
                      overlap: bool = True, timings: dict | None = None, report: bool = False,
                      score: str | os.PathLike | None = None) -> Path:
    """Merge the checkpoints a config names into ``out``, streaming one tensor group at a time.

    Args:
      config: a :class:`MergeConfig` or the path of a YAML config.
      out: the output directory (absent or empty, unless ``force``); never empty, ``.``, the
        working directory, a parent of the config or of an input (:mod:`swudi_jax.checkpoint.io.output`).
      force: replace an existing ``out`` (only once the new one is complete, and only if it is
        still what the run saw at the start).
      dry_run: validate everything and print the plan; nothing is read beyond headers, nothing written.
      progress: show a progress bar over tensor groups (stderr).
      max_group_bytes: cap on (N + 2) × a group's tensor bytes; one group is held at once, two
        with ``overlap``.
      copy_tokenizer: copy the tokenizer files (the base's, or ``tokenizer_source``'s) to ``out``.
      overlap: read the next group and write the previous one while this one merges
        (:mod:`swudi_jax.checkpoint.stream`; same results as ``overlap=False``, at most 2 groups held).
      timings: if a dict, filled with the merge loop's busy seconds per stage and its wall time.
      report: also write the merge report into ``out`` and print its summary (same weights;
        :mod:`swudi_jax.checkpoint.report_files`).
      score: a checkpoint of per-task input Grams ``{tensor: (N, n, n)}`` (as a config's
        ``grams``): the report then gives ρ of the merge and of each expert (implies ``report``).
    Returns:
      ``out`` as a Path.
    Raises:
      ValueError (``ConfigError``, ``CheckpointError``, ``OutputError``, ``NonFiniteOutput``)
      naming the file and tensor, before any output is in place; OSError naming the file
      being written (disk full, file-size limit).
    """
    config, out, work = _start(config, out, force, score)
    method = config.method.spec
    if dry_run:
        print(plan_checkpoints(config, max_group_bytes=max_group_bytes).describe())
        return out
    with OutputSlot(out, force=force) as slot, _opened(config) as (base, experts, grams), \
            _Reporting.opened(report, score) as reporting:
        plan = plan_merge(config, base, experts, grams, max_group_bytes=max_group_bytes)
        if plan.guesses:
            warnings.warn("the layout of some tensors is a guess (--dry-run shows the plan): "
                          + "; ".join(plan.guesses), stacklevel=2)
        side_files = plan_side_files(config.base_model)
        resolved = prepare(config.method, _model_chunks(plan, base, experts, progress))
        collector = reporting.start(plan, resolved)
        resolver = tensor_resolver(config, [p.path for p in plan.plans], {p.path: p.layers for p in plan.plans})
        same_as_base = [config.has_base and method.base != "joins"] * len(experts)  # a joining base is an input
        tmp = slot.tmp
        target, writer = _open_weights(plan, base, tmp)
        sizes = padded_sizes(plan.groups, method.kind == "elementwise")

        read = _group_reader(plan, base, experts, grams, work, same_as_base)

        def compute(g, arrays):  # the caller's thread: one compiled call, results checked finite
            group = list(plan.groups[g])
            merged = merge_group(group, arrays[0], arrays[1], resolved, arrays[2],
                                 config.multi_device, resolver, work, config.has_base,
                                 pad_to=sizes[g], host_output=True, report=collector)
            return checked_outputs(merged, {p.path: plan.out_dtypes[p.path] for p in group}, config.merge_method)

        def write(g, merged):  # the write-behind thread, in group order
            with naming_file(target):
                for key in (p.path for p in plan.groups[g]):
                    writer.write(key, merged[key])

        loop = run_overlapped if overlap else run_sequential
        with _closing(writer, target):
            split = loop(range(len(plan.groups)), read, compute, write,
                         progress=lambda items: _progress(items, progress, "merging"))
        if timings is not None:
            timings.update(split.as_dict())
        _warn_zero_task_vectors(config, same_as_base)
        write_beside(plan, tmp, copy_tokenizer, side_files, resolved.scale)
        reporting.write(tmp, out)
        slot.publish()
    reporting.show()
    return out


def _start(config: MergeConfig | str | os.PathLike, out, force: bool, score) -> tuple[MergeConfig, Path, str]:
    """(the config, OUT checked against every input, the compute dtype), x64 turned on for float64."""
    config = config if isinstance(config, MergeConfig) else load_config(config)
    inputs = [p for s in config.sources for p in (s.path, s.adapter) if p is not None]
    out = check_output_target(out, protected=[config.source, config.base_model, *config.models, *inputs, config.grams,
                                              config.tokenizer_source, score], force=force)
    work = config.method.spec.work_dtype(config.dtype)
    if work == "float64":
        jax.config.update("jax_enable_x64", True)
    return config, out, work


def _open_weights(plan: MergePlan, base: ckio.CheckpointReader, tmp: Path):
    """(the weights file, its writer) in the temporary output folder, with the base's metadata."""
    metadata = getattr(base, "metadata", None) or None
    entries = {p.path: (p.shape, plan.out_dtypes[p.path]) for p in plan.plans}
    target = ckio.weights_path(tmp, plan.out_format)
    return target, ckio.open_writer(target, plan.out_format, entries, shard_size=_shard_bytes(plan), metadata=metadata)


class _Reporting:
    """``--report`` and ``--score`` for one run: the calibration Grams, the collector the merge
    shows its linear groups to, the report's files and the summary printed at the end."""

    def __init__(self, wanted: bool, calibration: _GramReader | None):
        self.wanted, self.calibration = wanted or calibration is not None, calibration
        self.collector: ReportCollector | None = None
        self.lines: list[str] = []

    @classmethod
    @contextlib.contextmanager
    def opened(cls, report: bool, score: str | os.PathLike | None) -> Iterator["_Reporting"]:
        reader = None if score is None else _open(Path(score), "auto", "--score")
        try:
            yield cls(report, None if reader is None else _GramReader(reader))
        finally:
            if reader is not None:
                reader.close()

    def start(self, plan: MergePlan, resolved) -> ReportCollector | None:
        """The collector for the merge (None when no report was asked for); the Grams checked first."""
        n = len(plan.config.models)
        if self.calibration is not None:
            _check_grams(plan.plans, self.calibration.reader, n, required=False)
        if self.wanted:
            names = [str(m) for m in plan.config.models]
            self.collector = ReportCollector(resolved, n, names, self.calibration)
        return self.collector

    def write(self, folder: Path, out: Path) -> None:
        """The report's files into ``folder`` (the temporary output that becomes ``out``)."""
        if self.collector is not None:
            result = self.collector.result()
            self.lines = [result.summary(), write_report(result, folder, shown_as=str(out))]

    def show(self) -> None:
        for line in self.lines:
            print(line)


__all__ = ["CONFIG_NAME", "MergePlan", "merge_checkpoints", "plan_checkpoints", "plan_merge"]
