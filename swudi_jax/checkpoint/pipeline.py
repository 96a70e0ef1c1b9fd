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

With ``distributed=True`` the same steps run in every process of JAX's distributed runtime, each
on its share of the groups, and process 0 takes step 5 (:mod:`swudi_jax.checkpoint.distributed`).

Every file read from a model folder resolves inside it (:mod:`swudi_jax.checkpoint.io.confine`). Any
failure or interrupt before the move removes the temporary directory: OUT is either absent
(or, with ``force``, its previous content) or complete. Inputs are only read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint import slices as sl
from swudi_jax.checkpoint import vocabulary as voc
from swudi_jax.checkpoint.adapter_output import check_adapter_output, merge_to_adapter
from swudi_jax.checkpoint.config import ADAPTER_FORMAT, MergeConfig, load_config, numpy_dtype, tensor_resolver
from swudi_jax.checkpoint.distributed import Team
from swudi_jax.checkpoint.global_groups import merge_global_groups
from swudi_jax.checkpoint.io.output import check_output_target
from swudi_jax.checkpoint.io.reader import naming_file
from swudi_jax.checkpoint.io.side_files import plan_side_files
from swudi_jax.checkpoint.io.sources import ModelSource
from swudi_jax.checkpoint.lora_factors import FactorMerge, plan_factor_merge
from swudi_jax.checkpoint.merge_plan import MergePlan
from swudi_jax.checkpoint.output_checks import checked_outputs
from swudi_jax.checkpoint.output_files import CONFIG_NAME, write_adapter_beside, write_beside
from swudi_jax.checkpoint.report_files import write_report
from swudi_jax.checkpoint.stream import run_overlapped, run_sequential
from swudi_jax.checkpoint.vocab_rows import VocabularyReaders
from swudi_jax.maths.linalg import is_floating
from swudi_jax.maths.validation import non_finite
from swudi_jax.model.batching import compile_groups, padded_sizes
from swudi_jax.model.flat import mismatch
from swudi_jax.model.layout import LeafPlan
from swudi_jax.model.merger import DEFAULT_MAX_GROUP_BYTES, chunk_plans, chunk_stack, merge_group, prepare
from swudi_jax.model.report import ReportCollector



def _open(path, fmt: str, who: str) -> ckio.CheckpointReader:
    """A reader over a path or a resolved :class:`~swudi_jax.checkpoint.io.sources.ModelSource` (Hub snapshot,
    PEFT adapter over its base, orbax step/item); a checkpoint holding no tensor is refused (a wrong
    folder: there is nothing to merge)."""
    try:
        reader = path.open(fmt) if isinstance(path, ModelSource) else ckio.open_checkpoint(path, fmt)
    except ckio.CheckpointError as exc:
        raise ckio.CheckpointError(f"{who}: {exc}") from None
    if not reader.keys():
        reader.close()
        raise ckio.CheckpointError(f"{who}: {reader.path} holds no tensors ({reader.format} checkpoint with an empty "
                                   "tensor list): nothing to merge; is it the model's folder?")
    return reader


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


def _vocabulary_views(config: MergeConfig, readers: list) -> list:
    """The readers with their vocabulary tensors re-indexed to the output vocabulary
    (:mod:`swudi_jax.checkpoint.vocab_rows`); the models keyed by their resolved sources."""
    name = f"config {config.source}" if config.source else "config"
    slots = list(config.sources or ())
    listed = list(dict.fromkeys(config.listed or slots[1:]))
    base = slots[0] if config.has_base else listed[0]
    order = listed + ([base] if base not in listed else [])
    folders = {key: key.path for key in order}
    spec = config.tokenizer
    if spec.tokens:  # a `tokens:` source names a model by its folder: the merge's key for it
        by_folder = {key.path.resolve(): key for key in order}
        spec = dataclasses.replace(spec, tokens={t: dataclasses.replace(s, model=by_folder.get(Path(s.model).resolve(),
                                                                                               s.model))
                                                 if s.model is not None else s for t, s in spec.tokens.items()})
    try:
        vocab = voc.build_vocabulary(spec, base, folders, name, base_given=config.has_base)
        if config.modules is not None and not vocab.identity:
            key = "tokenizer" if "tokenizer" in config.tokenizer.given else "tokenizer_source"
            raise voc.VocabularyError(
                f"{name}: `{key}` with `slices`/`modules` needs the models' vocabularies to agree with the output's "
                "(their embedding and head rows kept as they are); these differ, and mergekit then re-indexes "
                "the embedding rows among the first slice's models and the head rows among the last slice's "
                f"(not built here): use the `models:` form, or leave `{key}` out")
        dtype = None if config.dtype is None else numpy_dtype(config.dtype)
        views = VocabularyReaders(readers, slots, order, base if config.has_base else None, vocab, dtype, name)
        for reader in readers:
            views.check_others(reader, sorted(set(vocab.limits.values())))
    except voc.VocabularyError as exc:
        raise ckio.CheckpointError(str(exc)) from None
    return views.views


@contextlib.contextmanager
def _opened(config: MergeConfig) -> Iterator[tuple[ckio.CheckpointReader, list[ckio.CheckpointReader], Any]]:
    readers: list[ckio.CheckpointReader] = []
    try:
        sources = config.sources or (config.base_model, *config.models)
        labels = config.model_labels or [f"models[{i}]" for i in range(len(sources) - 1)]
        first = "base_model" if config.has_base else next(iter(labels), "models[0]")
        readers.append(_open(sources[0], config.format, first))
        for label, path in zip(labels, sources[1:]):
            readers.append(_open(path, config.format, label))
        models = readers[:len(sources)]
        if config.tokenizer is not None:
            models = _vocabulary_views(config, models)
        grams = None
        if config.grams is not None:
            grams = _open(config.grams, "auto", "grams")
            readers.append(grams)
        yield models[0], models[1:], grams
    finally:
        for reader in readers:
            reader.close()


def _sliced(config: MergeConfig, readers: Sequence[ckio.CheckpointReader]) -> sl.SlicePlan:
    """The recipe of every output tensor of a ``slices:`` config (headers only)."""
    names = [s.describe() for s in config.sources]
    plan = sl.plan_tensors(config.modules, config.method.spec, [_signature(r) for r in readers], names,
                           f"config {config.source}")
    if config.method.spec.preparation(config.method.options) is not None and len(plan.input_sets()) > 1:
        raise ValueError(f"config {config.source}: {config.merge_method!r} runs a whole-model pass over one set of "
                         "models; these slices merge different sets of models")
    return plan


def _groups(plans: Sequence[LeafPlan], sliced: sl.SlicePlan | None, max_group_bytes, copies: int,
            elementwise: bool) -> list[list[LeafPlan]]:
    """The compile groups; with slices, the tensors merged from one set of models group together."""
    if sliced is None:
        return compile_groups(plans, max_group_bytes, copies=copies, elementwise=elementwise)
    parts: dict[tuple, list[LeafPlan]] = {}
    for p in plans:
        parts.setdefault(sliced.recipes[p.path].input_set, []).append(p)
    return [g for part in parts.values() for g in compile_groups(part, max_group_bytes, copies=copies,
                                                                  elementwise=elementwise)]


def plan_merge(config: MergeConfig, base: ckio.CheckpointReader, experts: Sequence[ckio.CheckpointReader],
               grams: ckio.CheckpointReader | None = None, *, max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES) -> MergePlan:
    """Check the checkpoints against each other and decide every tensor's fate (no tensor data is read).
    With ``slices``, ``base`` and ``experts`` are the readers of ``config.sources``."""
    sliced = None
    if config.modules is None:
        _check_same_tensors(base, experts)
        signature = _signature(base)
    else:
        sliced = _sliced(config, [base, *experts])
        signature = sliced.signature([_signature(r) for r in (base, *experts)])
    # layout "auto": from the leaf names (kernel: Flax, weight: torch), else from the format
    rules = config.leaf_rules().for_paths(list(signature), fallback="torch" if base.format == "safetensors" else "flax")
    out_format = base.format if config.out_format == "auto" else config.out_format
    plans, guesses = rules.plan_with_guesses(signature)
    if config.method.spec.kind == "data":
        _check_grams(plans, grams, len(config.models), required=True)
    if out_format == ADAPTER_FORMAT:
        check_adapter_output(config, experts)
    elementwise = config.method.spec.kind == "elementwise"
    groups = _groups(plans, sliced, max_group_bytes, len(experts) + 2, elementwise)
    out_dtypes = {}
    for p in plans:
        floating = p.kind != "passthrough"
        out_dtypes[p.path] = numpy_dtype(config.out_dtype) if (config.out_dtype and floating) else np.dtype(p.dtype)
    return MergePlan(config, rules.layout, base.format, out_format, tuple(plans), tuple(tuple(g) for g in groups),
                     out_dtypes, guesses, sliced, getattr(base, "vocabulary", None))


def plan_checkpoints(config: MergeConfig | str | os.PathLike, *,
                     max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES) -> MergePlan:
    """The plan :func:`merge_checkpoints` follows for ``config`` (what its ``dry_run`` prints):
    the checkpoints are opened (headers and metadata only), checked and planned, then closed."""
    config = config if isinstance(config, MergeConfig) else load_config(config)
    with _opened(config) as (base, experts, grams):
        return plan_merge(config, base, experts, grams, max_group_bytes=max_group_bytes)


def _compute(arrays: dict[str, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    """Floating arrays cast to the compute dtype (mixed-dtype inputs meet in it); others as read.
    None (no ``dtype`` in the config): as stored; the merge promotes them per group."""
    if dtype is None:
        return arrays
    target = numpy_dtype(dtype)
    return {k: a.astype(target, copy=False) if is_floating(a.dtype) else a for k, a in arrays.items()}


def _read_inputs(plan: MergePlan, readers: Sequence[ckio.CheckpointReader], keys: Sequence[str],
                 expert_keys: Sequence[str] | None = None):
    """(base arrays, expert arrays) of output tensors ``keys`` (one group), each {key: array};
    with slices, read from each recipe's sources (:meth:`~swudi_jax.checkpoint.slices.SlicePlan.read`).
    ``expert_keys``: the experts' tensors to read, when not all of ``keys`` (the rest merge from
    LoRA factors, never with slices)."""
    if plan.sliced is not None:
        return plan.sliced.read(keys, readers, _read_group)
    expert_keys = keys if expert_keys is None else expert_keys
    return _read_group(readers[0], keys), [_read_group(e, expert_keys) for e in readers[1:]]


def _model_chunks(plan: MergePlan, readers, progress: bool, groups: Sequence[int] | None = None):
    """``chunks(leaves)``: the selected tensors' task-vector stacks in float32, read group by
    group from disk (``leaves``: see :data:`~swudi_jax.methods.spec.CHUNK_LEAVES`), from
    ``groups`` only when given (this process's share of a distributed merge)."""

    def chunks(leaves: str = "merged"):
        selected = [chunk_plans(plan.groups[g], leaves) for g in (range(len(plan.groups)) if groups is None else groups)]
        for group in _progress([g for g in selected if g], progress, "whole-model pass"):
            base_arrays, expert_arrays = _read_inputs(plan, readers, [p.path for p in group])
            for leaf in group:
                b = base_arrays[leaf.path].astype(np.float32)
                yield chunk_stack(leaf, np.stack([e[leaf.path].astype(np.float32) - b for e in expert_arrays]), leaves)

    return chunks


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="group", file=sys.stderr, leave=False)


def _group_reader(plan: MergePlan, readers, grams, work: str, same_as_base: list[bool], factors: FactorMerge):
    """``read(g)`` for the prefetch thread: group g's inputs read, checked finite on the host and
    cast to the compute dtype (and its Grams); the experts' tensors that merge from LoRA factors
    (``factors``) are not read. Notes in ``same_as_base`` which experts still equal the base."""

    def read(g):
        keys = [p.path for p in plan.groups[g]]
        dense = [k for k in keys if k not in factors.paths]
        base_arrays, expert_arrays = _read_inputs(plan, readers, keys, dense)
        base_arrays, expert_arrays = _compute(base_arrays, work), [_compute(e, work) for e in expert_arrays]
        for i, arrays in enumerate(expert_arrays if plan.sliced is None else ()):
            same_as_base[i] = same_as_base[i] and factors.unchanged(i, keys) and all(
                np.array_equal(arrays[k], base_arrays[k]) for k in dense)
        group_grams = None
        if grams is not None and plan.groups[g][0].kind == "linear":
            group_grams = _read_group(grams, keys)
        return base_arrays, expert_arrays, group_grams

    return read


def _group_stages(plan: MergePlan, resolved, resolver, work: str, multi_device, factors: FactorMerge, writer,
                  target: Path, reporting: "_Reporting"):
    """The merge loop's ``compute(g, arrays)`` (the caller's thread: group g's tensors merged in one
    compiled call, those in ``factors.paths`` from their LoRA factors, results checked finite; the
    dense linear ones shown to the report, if any) and ``write(g, merged)`` (the write-behind
    thread, in group order)."""
    config = plan.config
    sizes = padded_sizes(plan.groups, resolved.spec.kind == "elementwise")

    def compute(g, arrays):
        group = list(plan.groups[g])
        dense = [p for p in group if p.path not in factors.paths]
        merged = merge_group(dense, arrays[0], arrays[1], resolved, arrays[2], multi_device, resolver, work,
                             plan.has_base(g), pad_to=sizes[g], host_output=True,
                             report=reporting.collector_for(plan, g, [p.path for p in group if p.path in factors.paths]))
        merged.update(factors.merge([p for p in group if p.path in factors.paths], arrays[0]))
        return checked_outputs(merged, {p.path: plan.out_dtypes[p.path] for p in group}, config.merge_method)

    def write(g, merged):
        with naming_file(target):
            for key in (p.path for p in plan.groups[g]):
                writer.write(key, merged[key])

    return compute, write


def _dense_reader(plan: MergePlan, readers, work: str):
    """``read(keys)``: the base's and the experts' arrays, checked finite, in the compute dtype."""

    def read(keys):
        base_arrays, expert_arrays = _read_inputs(plan, readers, keys)
        return _compute(base_arrays, work), [_compute(e, work) for e in expert_arrays]

    return read


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


def _resolver(plan: MergePlan):
    """The per-tensor option values: mergekit's per-model and per-tensor settings, or with slices
    the slice's (:class:`~swudi_jax.checkpoint.slices.SliceParameters`)."""
    config = plan.config
    if plan.sliced is not None:
        return sl.SliceParameters(config.method.spec, config.modules, plan.sliced, config.tensor_parameters,
                                  config.parameters)
    return tensor_resolver(config, [p.path for p in plan.plans], {p.path: p.layers for p in plan.plans})


def _publish(plan: MergePlan, slot, copy_tokenizer: bool, side_files: Sequence[str], scale: float,
             write_model_card: bool) -> None:
    """The files beside the weights, then the move to OUT (process 0's, once every process has written)."""
    write_beside(plan, slot.tmp, copy_tokenizer, side_files, scale, write_model_card)
    slot.publish()


def _publish_adapter(plan: MergePlan, slot, experts, base, resolved, resolver, work: str, progress: bool) -> None:
    """``out_format: peft``: the merge from the adapters' factors written as one PEFT adapter, then
    the move to OUT (one process)."""
    merge_to_adapter(plan, experts, _dense_reader(plan, [base, *experts], work), resolved, resolver, work,
                     slot.tmp, progress=lambda items: _progress(items, progress, "merging"))
    write_adapter_beside(plan, slot.tmp, resolved.scale)
    slot.publish()


def _warn_zero_task_vectors(config: MergeConfig, same_as_base: Sequence[bool], lead: bool = True) -> None:
    if not lead:
        return
    given = (config.given or {}).get("models") or config.models
    for i, same in enumerate(same_as_base):
        if same:
            label = config.model_labels[i] if config.model_labels else f"models[{i}]"
            warnings.warn(f"{label} ({given[i]}) equals the base model in every tensor: its task vector is zero",
                          stacklevel=3)


def _warn_guesses(plan: MergePlan, lead: bool) -> None:
    if plan.guesses and lead:
        warnings.warn("the layout of some tensors is a guess (--dry-run shows the plan): " + "; ".join(plan.guesses),
                      stacklevel=3)


def _stored_float64(work: str | None, readers) -> None:
    """``dtype`` omitted: stored float64 computes in float64, as mergekit's (jax_enable_x64 on)."""
    if work is None and any(np.dtype(d) == np.float64 for r in readers for _, d in _signature(r).values()):
        jax.config.update("jax_enable_x64", True)


def _x64_restored(fn):
    """A float64 merge turns ``jax_enable_x64`` on for the whole process (the prefetch and writer
    threads must see it too); the caller's setting is restored when the merge returns or fails."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        before = bool(jax.config.jax_enable_x64)
        try:
            return fn(*args, **kwargs)
        finally:
            jax.config.update("jax_enable_x64", before)
    return run


@_x64_restored
def merge_checkpoints(config: MergeConfig | str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                      dry_run: bool = False, progress: bool = True,
                      max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES, copy_tokenizer: bool = True,
                      overlap: bool = True, timings: dict | None = None, write_model_card: bool = True,
                      distributed: bool = False, report: bool = False, score: str | os.PathLike | None = None) -> Path:
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
      write_model_card: README.md and ``mergekit_config.yml`` too (mergekit's ``--write-model-card``).
      distributed: be one of the processes of JAX's distributed runtime, each calling this with the same
        arguments: each merges its share and process 0 publishes OUT, byte for byte the single-process
        merge (:mod:`swudi_jax.checkpoint.distributed`; the runtime started from the environment if need be).
      report: also write the merge report into ``out`` and print its summary (same weights;
        :mod:`swudi_jax.checkpoint.report_files`); one process only, dense output only (refused with
        ``distributed`` and ``out_format: peft``).
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
    _check_one_output(config, distributed, report or score is not None)
    team = Team.start(distributed)  # one process, or this process's part in a distributed merge
    options = dict(out=out, force=force, max_group_bytes=max_group_bytes, copy_tokenizer=copy_tokenizer, card=write_model_card)
    with team.output_slot(out, force, config, options) as slot, _opened(config) as (base, experts, grams), \
            _Reporting.opened(report, score) as reporting:
        plan = plan_merge(config, base, experts, grams, max_group_bytes=max_group_bytes)
        _warn_guesses(plan, team.lead)
        _stored_float64(work, [base, *experts])
        side_files = plan_side_files(config.base_model)
        share = team.assign(plan, config.method, config.multi_device)
        resolved = prepare(config.method, _model_chunks(plan, [base, *experts], progress and team.lead, share.prepare),
                           team.combine)
        resolver = _resolver(plan)
        if plan.out_format == ADAPTER_FORMAT:  # one PEFT adapter: the merge from the adapters' factors
            _publish_adapter(plan, slot, experts, base, resolved, resolver, work, progress)
            return out
        reporting.start(plan, resolved)
        # a joining base is an input; with slices each slice has its own inputs (not checked)
        same_as_base = [config.has_base and method.base != "joins" and plan.sliced is None] * len(experts)
        target, writer = _open_weights(plan, base, slot.tmp, team)
        factors = plan_factor_merge(config, plan, experts, resolved, resolver, work)
        read = _group_reader(plan, [base, *experts], grams, work, same_as_base, factors)
        compute, write = _group_stages(plan, resolved, resolver, work, share.multi_device, factors, writer, target,
                                       reporting)
        loop = run_overlapped if overlap else run_sequential
        with team.together("merging"), _closing(writer, target):
            merge_global_groups(share.global_groups, read, plan, resolved, resolver, writer, team)
            split = loop(share.local, read, compute, write,
                         progress=lambda items: team.watch(_progress(items, progress and team.lead, "merging")))
        if timings is not None:
            timings.update(split.as_dict(), share=share.summary())
        _warn_zero_task_vectors(config, team.all(same_as_base), team.lead)
        reporting.write(slot.tmp, out)
        team.lead_step("publish", functools.partial(_publish, plan, slot, copy_tokenizer, side_files, resolved.scale,
                                                    write_model_card))
    reporting.show()
    return out


def _start(config: MergeConfig | str | os.PathLike, out, force: bool, score) -> tuple[MergeConfig, Path, str | None]:
    """(the config, OUT checked against every input, the compute dtype: None when the config
    gives none), x64 turned on for float64."""
    config = config if isinstance(config, MergeConfig) else load_config(config)
    inputs = [p for s in config.sources for p in (s.path, s.adapter) if p is not None]
    out = check_output_target(out, protected=[config.source, config.base_model, *config.models, *inputs, config.grams,
                                              config.tokenizer_source, score], force=force)
    work = None if config.dtype is None else config.method.spec.work_dtype(config.dtype)
    if work == "float64":
        jax.config.update("jax_enable_x64", True)
    return config, out, work


def _check_one_output(config: MergeConfig, distributed: bool, report: bool) -> None:
    """Refuse what one process must write: a PEFT adapter, or the merge report (each process sees
    only its share of the layers), in a distributed merge; the report of an adapter output."""
    if distributed and config.out_format == ADAPTER_FORMAT:
        raise ValueError(f"out_format {ADAPTER_FORMAT} is written by one process: run it without --distributed")
    if distributed and report:
        raise ValueError("--report and --score need every layer in one process; a --distributed merge splits the "
                         "layers between processes: run the merge without --distributed for its report")
    if report and config.out_format == ADAPTER_FORMAT:
        raise ValueError(f"--report and --score cover merges written as weights; out_format {ADAPTER_FORMAT} writes "
                         "an adapter: run with another out_format for the report (same merge)")


def _open_weights(plan: MergePlan, base: ckio.CheckpointReader, tmp: Path, team: Team):
    """(the weights file, its writer) in the temporary output folder, with the base's metadata
    (and, from orbax to orbax without ``slices:``, its typed PRNG keys)."""
    entries = {p.path: (p.shape, plan.out_dtypes[p.path]) for p in plan.plans}
    target = ckio.weights_path(tmp, plan.out_format)
    keys = {"key_impls": base.key_impls()} if (plan.out_format == "orbax" and plan.sliced is None
                                               and hasattr(base, "key_impls")) else {}
    return target, team.open_writer(target, plan, entries, shard_size=plan.config.out_shard_size,
                                    metadata=getattr(base, "metadata", None) or None, **keys)


class _Reporting:
    """``--report`` and ``--score`` for one run: the calibration Grams, the collector the merge
    shows its linear groups to, the report's files and the summary printed at the end."""

    def __init__(self, wanted: bool, calibration: _GramReader | None):
        self.wanted, self.calibration = wanted or calibration is not None, calibration
        self.collector: ReportCollector | None = None
        self.lines: list[str] = []
        self.inputs: tuple = ()

    @classmethod
    @contextlib.contextmanager
    def opened(cls, report: bool, score: str | os.PathLike | None) -> Iterator["_Reporting"]:
        reader = None if score is None else _open(Path(score), "auto", "--score")
        try:
            yield cls(report, None if reader is None else _GramReader(reader))
        finally:
            if reader is not None:
                reader.close()

    def start(self, plan: MergePlan, resolved) -> None:
        """The collector for the merge (none when no report was asked for); the Grams checked first."""
        n = len(plan.config.models)
        if self.calibration is not None:
            _check_grams(plan.plans, self.calibration.reader, n, required=False)
        if self.wanted:
            names = [str(m) for m in plan.config.models]
            self.collector = ReportCollector(resolved, n, names, self.calibration)
            self.inputs = (True, tuple(range(n + 1)))  # with slices: the base, then every model in order

    def collector_for(self, plan: MergePlan, g: int, factored: Sequence[str]) -> ReportCollector | None:
        """The collector group g's dense tensors are shown to, or None. Left out, and noted: the
        tensors merged from LoRA factors (``factored``: no dense task vectors), and with slices the
        groups of a slice that merges other models than the config's, in its order."""
        if self.collector is None:
            return None
        self.collector.leave_out(factored, "merged from LoRA factors")
        first = plan.groups[g][0]
        if plan.sliced is not None and first.kind == "linear" and plan.sliced.recipes[first.path].input_set != self.inputs:
            self.collector.leave_out([p.path for p in plan.groups[g]],
                                     "a slice merging other models than the base and `models` in order")
            return None
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
