"""The files a merge writes beside the weights (mergekit's output side effects): the base's side
files, the tokenizer (``tokenizer_source``) and chat template, config.json's ``torch_dtype`` (and,
with slices, its layer count), the
config as the user wrote it and the model card with its Hub front matter."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml

from swudi_jax.checkpoint import mergekit_config as mk
from swudi_jax.checkpoint import slices as sl
from swudi_jax.checkpoint import vocabulary as voc
from swudi_jax.checkpoint.io.reader import naming_file
from swudi_jax.checkpoint.io.side_files import copy_side_files
from swudi_jax.checkpoint.merge_plan import MergePlan
from swudi_jax.methods.spec import MethodSpec

PAPER = "https://arxiv.org/abs/2606.07289"
CONFIG_NAME = "merge_config.yaml"
MERGEKIT_CONFIG_NAME = "mergekit_config.yml"
"""mergekit's name for the config beside a merge (the config file's text, as mergekit writes it)."""


def _library_name(side_files: Sequence[str], out_format: str) -> str:
    """The Hub's ``library_name``: what loads the folder (peft, sentence-transformers, transformers, else swudi_jax)."""
    if out_format == "peft":
        return "peft"
    if "modules.json" in side_files or "config_sentence_transformers.json" in side_files:
        return "sentence-transformers"
    if out_format == "safetensors" and "config.json" in side_files:
        return "transformers"
    return "swudi_jax"


def _tokenizer_files(plan: MergePlan, out: Path, copy_tokenizer: bool, copied: list[str]) -> list[str]:
    """The tokenizer OUT gets: the built vocabulary's (written whatever ``--copy-tokenizer`` says,
    as mergekit saves the tokenizer it builds; the source folder's files when it is that file
    unchanged), else the base's as copied, or none with ``--no-copy-tokenizer``."""
    vocab = plan.vocabulary
    if vocab is None and copy_tokenizer:
        return copied
    for item in mk.tokenizer_files(out):
        item.unlink()
    copied = [c for c in copied if c not in mk.TOKENIZER_FILES]
    if vocab is None:
        return copied
    if vocab.unchanged:
        names = mk.copy_tokenizer(vocab.tokenizer.folder, out, "tokenizer_source")
    else:
        names = voc.write_tokenizer(vocab, out)
    voc.set_vocab_size(out, vocab.rows)  # mergekit sets the output vocabulary size
    return copied + names


def _finish_side_files(plan: MergePlan, out: Path, copy_tokenizer: bool, copied: Sequence[str]) -> list[str]:
    """mergekit's output files: the tokenizer (``tokenizer_source``/``tokenizer``,
    ``--no-copy-tokenizer``), the chat template, config.json's ``torch_dtype`` for ``out_dtype``.
    Returns the side files now in ``out``."""
    config = plan.config
    copied = _tokenizer_files(plan, out, copy_tokenizer, list(copied))
    if config.chat_template is not None:
        folders = [s.main for s in dict.fromkeys(config.listed or config.sources)]
        template = mk.resolve_chat_template(config.chat_template, folders, "chat_template")
        if template is not None and any(c in copied for c in mk.TOKENIZER_FILES):
            mk.write_chat_template(out, template)
            copied += [] if "tokenizer_config.json" in copied else ["tokenizer_config.json"]
        elif template is not None:
            warnings.warn("chat_template: no tokenizer is written (--no-copy-tokenizer), so the chat template is not "
                          "saved, as mergekit", stacklevel=3)
    if config.out_dtype is not None:
        mk.set_torch_dtype(out, config.out_dtype)
    return copied


def _compute_dtype(method: MethodSpec, asked: str | None) -> str:
    """The model card's compute dtype: the one the method runs in (:meth:`MethodSpec.work_dtype`)."""
    if asked is not None:
        work = method.work_dtype(asked)
        return work if work == asked else f"{work} (config: {asked}; {method.name} is not defined in it)"
    if set(method.compute_dtypes) >= {"bfloat16", "float16"}:
        return "as stored"
    return "float32 (float64 for float64 tensors)"


def model_card(plan: MergePlan, scale: float, side_files: Sequence[str] = ()) -> str:
    """README.md for the merged checkpoint: what was merged, how, and where the method comes from.

    YAML front matter (``base_model`` as the config wrote it, ``library_name``, ``tags``);
    checkpoint paths appear as the config wrote them, never as absolute paths of this machine.
    """
    c = plan.config
    given = c.to_dict(as_given=True)
    method = c.method.spec
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in given["parameters"].items()) or "| (none) | |"
    if c.modules is None:
        label, listed = f"Experts ({len(c.models)})", given["models"]
    else:  # every model the slices read (see the notes for which layers)
        listed = (c.given or {}).get("sources") or [s.spec() for s in c.sources]
        label = f"Models read by the slices ({len(listed)})"
    experts = "\n".join(f"  - `{p}`" for p in listed)
    counts = {k: sum(p.kind == k for p in plan.plans) for k in ("linear", "mean", "keep", "passthrough")}
    notes = "".join(f"\n- {n}" for n in c.notes)
    notes += "".join(f"\n- per-tensor `{k}`: `{v}`" for k, v in c.tensor_parameters.items())
    notes += "".join(f"\n- models[{i}] parameters: `{dict(p)}`" for i, p in enumerate(c.model_parameters) if p)
    notes += "\n" if notes else ""
    if method.operand == "models":
        formula = "θ = merge(θ1, …, θN), on the models' weights" + (" (with the base θ0)" if "base" in method.inputs else "")
    else:
        formula = f"θ = θ0 + s · merge(τ1, …, τN),\nτi = θi − θ0, with s = {scale:g}."
    base = f"`{(c.given or {}).get('base_model') or c.base_model}`" if c.has_base else \
        "none (the tensor layout and side files come from the first model)"
    front = yaml.safe_dump({"base_model": given["base_model"], "library_name": _library_name(side_files, plan.out_format),
                            "tags": ["mergekit", "merge", "swudi_jax", c.merge_method]}, sort_keys=False,
                           default_flow_style=None)
    return f"""---
{front}---
# Merged model ({c.merge_method})

Made with swudi_jax `swudi-merge`: {formula}

- **Base model:** {base}
- **{label}:**
{experts}
- **Method:** `{c.merge_method}` ({method.kind}); source: {method.source}
- **Layout:** {plan.layout}; **tensors:** {counts['linear']} merged by the method as linear maps, {counts['mean']} by the
  {'method' if method.kind == 'elementwise' else 'mean task vector'}, {counts['keep']} kept from the base, {counts['passthrough']} non-float copied.
- **Format:** {plan.out_format}; **out dtype:** {c.out_dtype or 'as the base'}; **compute dtype:** {_compute_dtype(method, c.dtype)}

| parameter | value |
|---|---|
{params}
{notes}
The full resolved config is in `{CONFIG_NAME}`, checkpoint paths as the original config wrote them (relative
ones are relative to the folder the merge ran in: re-run from there with `swudi-merge {CONFIG_NAME} OUT`).

SWUDI paper: arXiv 2606.07289, {PAPER}.
"""


def write_beside(plan: MergePlan, tmp: Path, copy_tokenizer: bool, side_files: Sequence[str], scale: float,
                 write_model_card: bool = True) -> None:
    """The files beside the weights: the base's side files, the tokenizer and chat template, the
    config as written and, unless ``write_model_card`` is off (mergekit's flag), the model card and
    ``mergekit_config.yml``."""
    config = plan.config
    copied = copy_side_files(config.base_model, tmp, side_files)
    copied = _finish_side_files(plan, tmp, copy_tokenizer, copied)
    if plan.sliced is not None:
        sl.write_layer_count(tmp / "config.json", plan.sliced)
    files = {CONFIG_NAME: config.to_yaml(as_given=True)}
    if write_model_card:
        files[MERGEKIT_CONFIG_NAME] = config.source_text or files[CONFIG_NAME]
        files["README.md"] = model_card(plan, scale, copied)
    for name, text in files.items():
        with naming_file(tmp / name):
            (tmp / name).write_text(text, encoding="utf-8")


def write_adapter_beside(plan: MergePlan, tmp: Path, scale: float) -> None:
    """The files beside a written adapter: the config as written and the model card (no base
    side files: an adapter folder holding a config.json would read as a whole model)."""
    with naming_file(tmp / CONFIG_NAME):
        (tmp / CONFIG_NAME).write_text(plan.config.to_yaml(as_given=True))
    with naming_file(tmp / "README.md"):
        (tmp / "README.md").write_text(model_card(plan, scale))


__all__ = ["CONFIG_NAME", "MERGEKIT_CONFIG_NAME", "PAPER", "model_card", "write_adapter_beside", "write_beside"]
