"""mergekit's output vocabulary: ``tokenizer_source`` and the ``tokenizer:`` block.

As mergekit 0.1.5 builds it (``mergekit/tokenizer/build.py``, ``config.py``; read, not copied),
on Hugging Face fast-tokenizer files (``tokenizer.json``; ``transformers`` is not needed):

- the **base** tokenizer is the base model's (with no ``base_model``, the first model: mergekit
  takes the first of a Python set of the models, an order that changes from run to run; here
  the first one listed), without the tokens whose id is ≥ its config.json ``vocab_size``
  (mergekit strips those, BPE models only);
- ``source: base`` keeps it; ``source: <model>`` takes that model's tokenizer as it is;
- ``source: union`` adds to it, in order, every token of the other tokenizers (base first,
  then the models as listed, each by id; ids ≥ the model's ``vocab_size`` skipped) that it
  lacks — as a plain added token (``normalized``, not special) — then every added token of
  all the tokenizers with the flags it was first seen with (one already in the vocabulary
  keeps its id and becomes an added token). New ids continue after the largest one.
  mergekit iterates a hash map there, so its order of the new tokens changes from run to
  run; the tokens and their rows are the same;
- each key of ``tokens:`` missing from the result is added as a plain token;
- each model's **permutation** maps every output id to the id of the same token string in
  that model's tokenizer (−1 where it lacks it). Where a token is missing from some model, or
  ``force``d, its row comes from its ``source`` (``tokens:``: a model — that model's row of
  the token; ``{kind: model_token, model, token | token_id}`` — that row of that model;
  ``{kind: zero}``), else by default from the one model that has it, else from the base
  when it has it, else the mean over the models that have it (zero, with a warning, when
  none does): :mod:`swudi_jax.checkpoint.vocab_rows` builds the rows.
- ``pad_to_multiple_of`` rounds the row count up; the extra rows are the mean row. The
  output config.json's ``vocab_size`` is the row count.

What mergekit would crash on, or build wrong, is refused naming the file or key: a
tokenizer without ``tokenizer.json`` (mergekit converts slow tokenizers with transformers),
stripping a non-BPE model, ids that leave a gap, a token whose id in a model is ≥ its
``vocab_size`` though another model brings it, a ``tokens:`` entry without a usable source.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from swudi_jax.checkpoint.io import confine

TOKENIZER_JSON, TOKENIZER_CONFIG, MODEL_CONFIG = "tokenizer.json", "tokenizer_config.json", "config.json"
SOURCES = ("base", "union")


class VocabularyError(ValueError):
    """A tokenizer setting or file that cannot be built as mergekit builds it; names the key or file."""


# ----------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class TokenSource:
    """One entry of ``tokenizer.tokens``: where a token's row comes from.

    kind: "model" (the token's row in ``model``), "model_token" (``model``'s row of ``token``
    or ``token_id``), "zero", or None (no source: only models that have the token give rows).
    """

    kind: str | None = None
    model: Hashable | None = None  # a model folder (as parsed), or the merge's key for it
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """``tokenizer_source`` / ``tokenizer:`` resolved: source "base", "union" or a model folder."""

    source: str | Path
    tokens: Mapping[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    given: Mapping[str, Any] = field(default_factory=dict)  # the config's keys as written


def _model_path(value: Any, resolve, where: str) -> Path:
    if isinstance(value, Mapping):
        if set(value) - {"model"} or "model" not in value:
            raise VocabularyError(f"{where}: a model is a path or {{model: path}}, got {dict(value)!r}")
        value = value["model"]
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise VocabularyError(f"{where}: a model path, got {value!r}")
    return resolve(value, where)


def _token_source(token: Any, entry: Any, resolve, where: str) -> TokenSource:
    if not isinstance(token, str) or not token:
        raise VocabularyError(f"{where}: a token is a non-empty string, got {token!r}")
    if entry is None:
        entry = {}
    if not isinstance(entry, Mapping) or set(entry) - {"source", "force"}:
        raise VocabularyError(f"{where}[{token!r}]: takes `source` and `force`, got {entry!r}")
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise VocabularyError(f"{where}[{token!r}].force must be true or false, got {force!r}")
    source, at = entry.get("source"), f"{where}[{token!r}].source"
    if source is None:
        return TokenSource(force=force)
    if isinstance(source, Mapping) and "kind" in source:
        kind = source["kind"]
        if kind == "zero" and set(source) == {"kind"}:
            return TokenSource("zero", force=force)
        if kind != "model_token" or set(source) - {"kind", "model", "token", "token_id"} or "model" not in source:
            raise VocabularyError(f"{at}: {{kind: zero}} or {{kind: model_token, model, token | token_id}}, "
                                  f"got {dict(source)!r}")
        if ("token" in source) == ("token_id" in source):
            raise VocabularyError(f"{at}: give one of `token` and `token_id`")
        tid = source.get("token_id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int)):
            raise VocabularyError(f"{at}.token_id must be an integer, got {tid!r}")
        if "token" in source and not isinstance(source["token"], str):
            raise VocabularyError(f"{at}.token must be a string, got {source['token']!r}")
        return TokenSource("model_token", _model_path(source["model"], resolve, f"{at}.model"), source.get("token"),
                           tid, force)
    return TokenSource("model", _model_path(source, resolve, at), force=force)


def parse_tokenizer(raw: Mapping[str, Any], resolve, name: str) -> TokenizerSpec | None:
    """The config's ``tokenizer_source`` or ``tokenizer:`` block (never both, as mergekit).

    Args:
      raw: the config mapping. resolve: ``resolve(path, where) -> Path`` (a model folder).
    """
    value, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if block is not None and value is not None:
        raise VocabularyError(f"{name}: give `tokenizer_source` or `tokenizer`, not both (mergekit refuses both)")
    given = {"tokenizer_source": value} if value is not None else {"tokenizer": block}
    tokens, pad = {}, None
    if block is not None:
        if not isinstance(block, Mapping) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
            raise VocabularyError(f"{name}: `tokenizer` takes `source`, `tokens` and `pad_to_multiple_of`, got {block!r}")
        value = block.get("source", "union")  # mergekit's default
        entries = block.get("tokens") or {}
        if not isinstance(entries, Mapping):
            raise VocabularyError(f"{name}: `tokenizer.tokens` maps tokens to {{source, force}}, got {entries!r}")
        tokens = {t: _token_source(t, e, resolve, f"{name}: `tokenizer.tokens`") for t, e in entries.items()}
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise VocabularyError(f"{name}: `tokenizer.pad_to_multiple_of` must be a positive integer, got {pad!r}")
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike, Mapping)):
        raise VocabularyError(f"{name}: `tokenizer_source` must be 'base', 'union' or a model path, got {value!r}")
    source = value if value in SOURCES else _model_path(value, resolve, f"{name}: `tokenizer_source`")
    return TokenizerSpec(source, tokens, pad, given)


# ----------------------------------------------------------------------------- tokenizer files


@dataclass(frozen=True)
class Tokenizer:
    """One model's fast tokenizer: ``tokenizer.json`` content, its full vocabulary (the model's
    and the added tokens, as ``get_vocab`` gives it) and config.json's ``vocab_size``."""

    folder: Path
    content: dict
    config: dict
    vocab_size: int | None
    vocab: dict[str, int]

    @property
    def added(self) -> list[dict]:
        return list(self.content.get("added_tokens") or [])

    @property
    def model_vocab(self) -> dict[str, int]:
        return _model_vocab(self.content, self.folder)


def _read_json(path: Path, root: Path) -> Any:
    try:
        return json.loads(confine.read_file(path, root, "tokenizer file").decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"{path}: not valid JSON ({exc})") from None


def _model_vocab(content: Mapping, folder: Path) -> dict[str, int]:
    model = content.get("model")
    if not isinstance(model, Mapping) or "vocab" not in model:
        raise VocabularyError(f"{folder / TOKENIZER_JSON}: no `model.vocab`: not a Hugging Face fast tokenizer")
    vocab = model["vocab"]
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        return {entry[0]: i for i, entry in enumerate(vocab)}
    if not isinstance(vocab, Mapping):
        raise VocabularyError(f"{folder / TOKENIZER_JSON}: `model.vocab` is neither a mapping nor a list")
    return {str(t): int(i) for t, i in vocab.items()}


def config_vocab_size(config: Mapping) -> tuple[int | None, str | None]:
    """config.json's vocabulary size and its key (``vocab_size``, or ``text_config.vocab_size``)."""
    if isinstance(config.get("vocab_size"), int):
        return config["vocab_size"], "vocab_size"
    text = config.get("text_config")
    if isinstance(text, Mapping) and isinstance(text.get("vocab_size"), int):
        return text["vocab_size"], "text_config.vocab_size"
    return None, None


def read_tokenizer(folder: Path) -> Tokenizer | None:
    """A model folder's fast tokenizer, or None when it has no tokenizer files at all.

    Raises:
      VocabularyError: tokenizer files without ``tokenizer.json`` (a slow tokenizer only).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    root = confine.model_root(folder)
    if not (folder / TOKENIZER_JSON).exists():
        slow = [n for n in ("tokenizer.model", "vocab.json", "vocab.txt", "spiece.model") if (folder / n).exists()]
        if slow:
            raise VocabularyError(f"{folder}: has {slow[0]} but no tokenizer.json: building a vocabulary needs the fast "
                                  "tokenizer file (transformers writes it: AutoTokenizer.from_pretrained(folder)."
                                  "save_pretrained(folder))")
        return None
    content = _read_json(folder / TOKENIZER_JSON, root)
    if not isinstance(content, dict):
        raise VocabularyError(f"{folder / TOKENIZER_JSON}: expected a JSON object")
    tok_config = _read_json(folder / TOKENIZER_CONFIG, root) if (folder / TOKENIZER_CONFIG).exists() else {}
    model_config = _read_json(folder / MODEL_CONFIG, root) if (folder / MODEL_CONFIG).exists() else {}
    vocab = _model_vocab(content, folder)
    for entry in content.get("added_tokens") or []:
        vocab[entry["content"]] = int(entry["id"])
    size, _ = config_vocab_size(model_config if isinstance(model_config, Mapping) else {})
    return Tokenizer(folder, content, tok_config if isinstance(tok_config, dict) else {}, size, vocab)


def stripped(tok: Tokenizer) -> Tokenizer:
    """mergekit's base tokenizer: without the tokens whose id is ≥ the model's ``vocab_size``."""
    limit = tok.vocab_size if tok.vocab_size is not None else len(tok.vocab)
    unused = {t for t, i in tok.vocab.items() if i >= limit}
    if not unused:
        return tok
    model = dict(tok.content["model"])
    if model.get("type") != "BPE":
        raise VocabularyError(f"{tok.folder / TOKENIZER_JSON}: {len(unused)} token(s) have ids ≥ vocab_size {limit} "
                              f"and the tokenizer is {model.get('type')}: mergekit strips only BPE tokenizers")
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in unused}

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    model["merges"] = [m for m in model.get("merges") or [] if keep(m)]
    content = {**tok.content, "model": model,
               "added_tokens": [e for e in tok.added if int(e["id"]) < limit]}
    return replace(tok, content=content, vocab={t: i for t, i in tok.vocab.items() if t not in unused})


# ----------------------------------------------------------------------------- the output vocabulary


@dataclass
class Vocabulary:
    """The output tokenizer and, per model, the permutation (output id → its id, −1: lacks it)."""

    tokenizer: Tokenizer
    vocab: dict[str, int]
    rows: int                                   # output rows (the vocabulary padded)
    permutations: dict[Hashable, np.ndarray]
    original: dict[Hashable, dict[str, int]]    # each model's own vocabulary (for `model_token` sources)
    tokens: Mapping[str, TokenSource]
    limits: dict[Hashable, int]                 # each model's vocab_size (config.json, else its tokenizer's)
    identity: bool = False                      # every model's rows stay as they are
    unchanged: bool = False                     # the output tokenizer is its folder's file as it is


def _plain_token(content: str, token_id: int) -> dict:
    """What ``add_tokens("...")`` registers: a normalized, non-special added token."""
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": True, "special": False}


class _Growing:
    """A tokenizer being extended as ``tokenizers``' add_tokens extends it."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.model_size = tok, len(tok.model_vocab)
        self.vocab = dict(tok.vocab)
        self.added = {int(e["id"]): dict(e) for e in tok.added}

    def add(self, entry: dict) -> None:
        """An identical added token is skipped; one of a known content keeps its id and takes
        these flags; a new one takes the next id."""
        content, flags = entry["content"], {k: v for k, v in entry.items() if k != "id"}
        if any({k: v for k, v in e.items() if k != "id"} == flags for e in self.added.values()):
            return
        if content in self.vocab:
            token_id = self.vocab[content]
        else:
            token_id = max([self.model_size] + [i + 1 for i in self.added])
        self.vocab[content] = token_id
        self.added[token_id] = {**entry, "id": token_id}

    def result(self) -> Tokenizer:
        content = {**self.tok.content, "added_tokens": [self.added[i] for i in sorted(self.added)]}
        return replace(self.tok, content=content, vocab=self.vocab)


def _union(base: Tokenizer, others: Sequence[Tokenizer]) -> Tokenizer:
    plain: dict[str, None] = {}
    added: dict[str, dict] = {}
    for tok in (base, *others):
        limit = tok.vocab_size if tok.vocab_size is not None else len(tok.model_vocab)
        for content, token_id in sorted(tok.vocab.items(), key=lambda item: item[1]):
            if token_id >= limit:
                warnings.warn(f"{tok.folder}: token {content!r} has id {token_id} ≥ vocab_size {limit}: left out of "
                              "the union, as mergekit", stacklevel=4)
            else:
                plain.setdefault(content)
        for entry in sorted(tok.added, key=lambda e: int(e["id"])):
            if int(entry["id"]) < limit:
                first = added.setdefault(entry["content"], entry)
                if {k: v for k, v in first.items() if k != "id"} != {k: v for k, v in entry.items() if k != "id"}:
                    warnings.warn(f"{tok.folder}: added token {entry['content']!r} has other settings than in an "
                                  "earlier tokenizer; the first ones are kept, as mergekit", stacklevel=4)
    out = _Growing(base)
    for content in plain:
        if content not in added and content not in base.vocab:
            out.add(_plain_token(content, -1))
    for entry in added.values():
        out.add(entry)
    return out.result()


def _contiguous(vocab: Mapping[str, int], where: str) -> None:
    ids = np.sort(np.fromiter(vocab.values(), np.int64, len(vocab)))
    if len(ids) and (ids[0] != 0 or ids[-1] != len(ids) - 1 or np.any(np.diff(ids) != 1)):
        missing = sorted(set(range(int(ids[-1]) + 1)) - set(ids.tolist()))[:5]
        raise VocabularyError(f"{where}: the output tokenizer's ids are not 0..{len(ids) - 1} (missing {missing}, "
                              "or repeated): its rows cannot be laid out (mergekit fails on this too)")


def _permutation(vocab: Mapping[str, int], tok: Tokenizer, rows: int) -> np.ndarray:
    limit = tok.vocab_size if tok.vocab_size is not None else len(tok.vocab)
    perm = np.full(rows, -1, np.int64)
    for content, new_id in vocab.items():
        old = tok.vocab.get(content)
        if old is None:
            continue
        if old >= limit:
            raise VocabularyError(f"{tok.folder}: token {content!r} has id {old} ≥ its vocab_size {limit}, but the "
                                  "output vocabulary has it: it has no row there (mergekit fails on this too)")
        perm[new_id] = old
    return perm


def _tokenizers(base: Hashable, models: Mapping[Hashable, Path], name: str) -> tuple[Tokenizer, dict]:
    base_tok = read_tokenizer(models[base])
    if base_tok is None:
        raise VocabularyError(f"{name}: the base model {models[base]} has no tokenizer.json to build the vocabulary "
                              "from")
    base_tok = stripped(base_tok)
    found: dict[Hashable, Tokenizer] = {}
    for key, folder in models.items():
        tok = base_tok if key == base else read_tokenizer(folder)
        if tok is None:
            warnings.warn(f"{name}: {folder} has no tokenizer files: taken to have the base's, as mergekit",
                          stacklevel=4)
            tok = replace(base_tok, folder=folder)
        found[key] = tok
    return base_tok, found


def build_vocabulary(spec: TokenizerSpec, base: Hashable, models: Mapping[Hashable, Path], name: str, *,
                     base_given: bool = True) -> Vocabulary:
    """The output vocabulary of a merge and each model's permutation.

    Args:
      spec: the parsed settings (``tokens`` sources naming models by their keys here).
      base: the key of the base model (the first model's without a ``base_model``).
      models: every distinct input model, key → folder, in mergekit's order (the models as
        listed, the base last unless listed).
      base_given: False when the config has no ``base_model`` (mergekit's choice is then arbitrary).
    """
    base_tok, found = _tokenizers(base, models, name)
    if not base_given and len({json.dumps(t.vocab, sort_keys=True) for t in found.values()}) > 1:
        warnings.warn(f"{name}: no base_model, and the models' tokenizers differ: mergekit builds on an arbitrary one "
                      f"of them (the first of a Python set, which changes from run to run); this takes the first "
                      f"listed, {models[base]}", stacklevel=3)
    if isinstance(spec.source, Path):
        out = read_tokenizer(spec.source)
        if out is None:
            raise VocabularyError(f"{name}: `tokenizer_source` {spec.source} has no tokenizer.json")
    elif spec.source == "union":
        out = _union(base_tok, [t for k, t in found.items() if k != base])
    else:
        out = base_tok
    as_read = read_tokenizer(out.folder)
    unchanged = as_read is not None and as_read.content == out.content
    if spec.tokens:
        grow = _Growing(out)
        for token in spec.tokens:
            if token not in grow.vocab:
                grow.add(_plain_token(token, -1))
        out = grow.result()
        unchanged = unchanged and out.vocab == as_read.vocab
    _contiguous(out.vocab, name)
    rows = len(out.vocab)
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    perms = {key: _permutation(out.vocab, tok, rows) for key, tok in found.items()}
    same = all(np.array_equal(p, np.arange(rows)) for p in perms.values()) and not any(
        t.force for t in spec.tokens.values())
    limits = {k: t.vocab_size if t.vocab_size is not None else len(t.vocab) for k, t in found.items()}
    return Vocabulary(out, out.vocab, rows, perms, {k: t.vocab for k, t in found.items()}, spec.tokens, limits, same,
                      unchanged and rows == len(out.vocab))


# ----------------------------------------------------------------------------- output files


def write_tokenizer(vocab: Vocabulary, out: Path) -> list[str]:
    """Write the output tokenizer into ``out``: ``tokenizer.json`` (its added tokens), the
    source's ``tokenizer_config.json`` with ``added_tokens_decoder`` brought up to date, and
    its ``special_tokens_map.json`` if any. Returns the names written."""
    tok = vocab.tokenizer
    names = [TOKENIZER_JSON]
    (out / TOKENIZER_JSON).write_text(json.dumps(tok.content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config = dict(tok.config)
    if "added_tokens_decoder" in config or tok.added:
        config["added_tokens_decoder"] = {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in tok.added}
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    names.append(TOKENIZER_CONFIG)
    special = tok.folder / "special_tokens_map.json"
    if special.exists():
        data = _read_json(special, confine.model_root(tok.folder))
        (out / special.name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        names.append(special.name)
    return names


def set_vocab_size(out: Path, rows: int) -> bool:
    """Set config.json's vocabulary size (``vocab_size``, or ``text_config.vocab_size``) to ``rows``."""
    path = out / MODEL_CONFIG
    if not path.is_file():
        return False
    content = json.loads(path.read_text())
    _, key = config_vocab_size(content)
    if key == "text_config.vocab_size":
        content["text_config"]["vocab_size"] = rows
    else:
        content["vocab_size"] = rows
    path.write_text(json.dumps(content, indent=2) + "\n")
    return True


__all__ = [
    "TokenSource",
    "Tokenizer",
    "TokenizerSpec",
    "Vocabulary",
    "VocabularyError",
    "build_vocabulary",
    "config_vocab_size",
    "parse_tokenizer",
    "read_tokenizer",
    "set_vocab_size",
    "stripped",
    "write_tokenizer",
]
