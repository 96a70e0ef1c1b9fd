"""Embedding and output-head rows re-indexed to the merge's output vocabulary, as mergekit does.

mergekit 0.1.5 (``mergekit/tokenizer/embed.py``, read, not copied) re-indexes every tensor
with a vocabulary axis — the names its architecture files mark (:data:`VOCAB_TENSORS`:
``model.embed_tokens.weight``, ``lm_head.weight``, ``transformer.wte.weight``, ...; axis 0) —
before the merge method sees it. For each model, output row ``i`` (token ``t``):

- the model's own row of ``t`` when it has ``t`` and ``t`` is not ``force``d;
- else ``t``'s default row (:mod:`swudi_jax.checkpoint.vocabulary`): its ``tokens:`` source,
  or the one model that has it, or the base when it has it, or the mean over the models
  that have it (summed model by model in the merge dtype, then divided), or zeros;
- rows past the vocabulary (``pad_to_multiple_of``) are the mean of the others.

Rows are built in the merge's dtype (``dtype``, else the inputs' promoted dtype), with that
dtype's rounding per operation, as mergekit's PyTorch code. The models are taken in
mergekit's order (as the config lists them, the base last unless listed). Tensors whose name
is not in the list but whose first axis is a model's vocabulary size are refused while the
vocabulary changes (their rows would be merged misaligned).

:class:`VocabularyReaders` presents each model's checkpoint with those tensors re-indexed, so
the rest of the pipeline (checks, grouping, streaming) is unchanged.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from swudi_jax.checkpoint.vocabulary import TokenSource, Vocabulary, VocabularyError
from swudi_jax.maths.linalg import is_floating

VOCAB_TENSORS = frozenset({
    "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias", "transformer.wte.weight",
    "model.language_model.embed_tokens.weight", "embed_tokens.weight", "decoder.embed_tokens.weight",
    "encoder.embed_tokens.weight", "shared.weight", "gpt_neox.embed_in.weight", "embed_out.weight",
    "roberta.embeddings.word_embeddings.weight", "distilbert.embeddings.word_embeddings.weight",
    "bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight", "cls.predictions.bias",
    "cls.predictions.decoder.weight", "transformer.embd.wte.weight", "lm_head.linear.weight", "lm_head.linear.bias",
    "transformer.word_embeddings.weight", "backbone.embeddings.weight", "model.tok_embeddings.weight",
    "transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight", "output.weight",
    "lm_head.decoder.weight", "vocab_projector.weight", "vocab_projector.bias",
})
"""Tensor names mergekit's architecture files give a vocabulary axis (always axis 0)."""


def _mean_rows(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The mean row, accumulated in float32 (float64 stays) and rounded once to ``dtype``."""
    acc = np.float64 if dtype == np.float64 else np.float32
    return np.mean(rows.astype(acc), axis=0).astype(dtype)


def _default_sources(vocab: Vocabulary, present: np.ndarray, order: Sequence[Hashable], base: Hashable | None,
                     name: str) -> dict[str, Any]:
    """mergekit's default source of each token that some model lacks (``tokens:`` ones as given):
    a folder, "zero", "mean", or a configured :class:`TokenSource`."""
    sources: dict[str, Any] = {}
    ids = {i: t for t, i in vocab.vocab.items()}
    count = present.sum(axis=0)
    forced = [vocab.vocab[t] for t, s in vocab.tokens.items() if s.force]
    for token_id in np.flatnonzero((count < len(order)) | np.isin(np.arange(present.shape[1]), forced)):
        token = ids.get(int(token_id))
        if token is None:
            continue  # a padding row
        if token in vocab.tokens:
            sources[token] = vocab.tokens[token]
        elif count[token_id] == 1:
            sources[token] = order[int(np.argmax(present[:, token_id]))]
        elif count[token_id] == 0:
            warnings.warn(f"{name}: token {token!r} is in no model: its rows are zero, as mergekit's", stacklevel=4)
            sources[token] = "zero"
        elif base is not None and base in order and present[order.index(base), token_id]:
            sources[token] = base
        else:
            sources[token] = "mean"
    return sources


def _label(key: Hashable) -> str:
    return key.describe() if hasattr(key, "describe") else str(key)


def check_sources(vocab: Vocabulary, sources: Mapping[str, Any], rows: Mapping[Hashable, int], name: str) -> None:
    """Every ``tokens:`` source that gives rows can give them (before any tensor is read).

    Args:
      sources: from :func:`_default_sources`. rows: each model's row count of the tensor.
    """
    for token, source in sources.items():
        if not isinstance(source, TokenSource) or source.kind == "zero":
            continue
        where = f"{name}: `tokenizer.tokens[{token!r}]`"
        if source.kind is None:
            raise VocabularyError(f"{where} needs a `source`: some model lacks the token (or it is forced), and it "
                                  "has none (mergekit fails on this too)")
        if source.model not in rows:
            raise VocabularyError(f"{where} takes its row from {source.model}, which is not one of the merged models "
                                  f"{[_label(k) for k in rows]}")
        if source.kind == "model" and vocab.permutations[source.model][vocab.vocab[token]] < 0:
            raise VocabularyError(f"{where}: {_label(source.model)} has no token {token!r}")
        if source.kind == "model_token":
            row = source.token_id if source.token_id is not None else vocab.original[source.model].get(source.token, -1)
            if not 0 <= row < rows[source.model]:
                what = source.token if source.token_id is None else source.token_id
                raise VocabularyError(f"{where}: {_label(source.model)} has no token {what!r} (rows: "
                                      f"{rows[source.model]})")


def _source_row(token: str, source: Any, vocab: Vocabulary, tensors: Mapping[Hashable, np.ndarray],
                present: np.ndarray, order: Sequence[Hashable], dtype: np.dtype) -> np.ndarray:
    """The default row of ``token`` (its source checked by :func:`check_sources`)."""
    token_id = vocab.vocab[token]
    shape = next(iter(tensors.values())).shape[1:]
    if source == "mean":
        total, n = np.zeros(shape, dtype), 0
        for i, key in enumerate(order):
            if present[i, token_id]:
                total = (total + tensors[key][vocab.permutations[key][token_id]]).astype(dtype)
                n += 1
        acc = np.float64 if dtype == np.float64 else np.float32
        return (total.astype(acc) / acc(n)).astype(dtype)
    if source == "zero" or getattr(source, "kind", None) == "zero":
        return np.zeros(shape, dtype)
    if not isinstance(source, TokenSource):  # a model key: the one model that has the token, or the base
        return tensors[source][vocab.permutations[source][token_id]]
    if source.kind == "model":
        return tensors[source.model][vocab.permutations[source.model][token_id]]
    row = source.token_id if source.token_id is not None else vocab.original[source.model][source.token]
    return tensors[source.model][row]


def vocabulary_rows(vocab: Vocabulary, tensors: Mapping[Hashable, np.ndarray], order: Sequence[Hashable],
                    base: Hashable | None, dtype: Any, name: str) -> dict[Hashable, np.ndarray]:
    """Each model's tensor re-indexed to the output vocabulary (see the module docstring).

    Args:
      tensors: {model folder: its tensor (rows on axis 0)}, every model of ``order``.
      order: the models in mergekit's order. base: the base model's folder, or None.
      dtype: the dtype the rows are built in.
    """
    dtype = np.dtype(dtype)
    tensors = {f: np.asarray(tensors[f]).astype(dtype, copy=False) for f in order}
    present = np.stack([vocab.permutations[f] >= 0 for f in order])
    sources = _default_sources(vocab, present, order, base, name)
    check_sources(vocab, sources, {k: t.shape[0] for k, t in tensors.items()}, name)
    defaults = {t: _source_row(t, s, vocab, tensors, present, order, dtype) for t, s in sources.items()}
    forced = {t for t, s in vocab.tokens.items() if s.force}
    n_tokens = len(vocab.vocab)
    out = {}
    for folder in order:
        perm = vocab.permutations[folder]
        new = np.zeros((vocab.rows,) + tensors[folder].shape[1:], dtype)
        own = perm >= 0
        new[own] = tensors[folder][perm[own]]
        for token, row in defaults.items():
            token_id = vocab.vocab[token]
            if not own[token_id] or token in forced:
                new[token_id] = row
        if vocab.rows > n_tokens:
            new[n_tokens:] = _mean_rows(new[:n_tokens], dtype)
        out[folder] = new
    return out


class VocabularyReaders:
    """The merge's checkpoint readers with their vocabulary tensors re-indexed.

    Args:
      readers: one reader per slot of the pipeline (base, experts), possibly the same model twice.
      folders: each slot's model folder. order: the distinct folders in mergekit's order.
      base: the base model's folder or None. dtype: the merge's dtype name (None: promoted).
    """

    def __init__(self, readers: Sequence[Any], folders: Sequence[Hashable], order: Sequence[Hashable], base: Hashable | None,
                 vocab: Vocabulary, dtype: np.dtype | None, name: str):
        self.vocab, self.order, self.base, self.name = vocab, list(order), base, name
        self.by_folder = {}
        for folder, reader in zip(folders, readers):
            self.by_folder.setdefault(folder, reader)
        self.dtype = dtype
        self._cache: dict[str, dict[Hashable, np.ndarray]] = {}
        self.shapes = {key: self._check(key) for key in readers[0].keys() if key in VOCAB_TENSORS}
        present = np.stack([vocab.permutations[k] >= 0 for k in self.order])
        sources = _default_sources(vocab, present, self.order, base, name)
        for key in self.shapes:
            check_sources(vocab, sources, {k: r.shape_dtype(key)[0][0] for k, r in self.by_folder.items()}, name)
        self.views = [_View(self, reader, folder) for reader, folder in zip(readers, folders)]

    def _check(self, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """The re-indexed (shape, dtype) of ``key``, or None when every model keeps its tensor."""
        sigs = {f: r.shape_dtype(key) for f, r in self.by_folder.items()}
        dtypes = [np.dtype(d) for _, d in sigs.values()]
        if not all(is_floating(d) for d in dtypes):
            raise VocabularyError(f"{self.name}: tensor {key!r} has a vocabulary axis but is not floating ({dtypes})")
        for folder, (shape, _) in sigs.items():
            need = int(self.vocab.permutations[folder].max(initial=-1)) + 1
            if not shape or shape[0] < need:
                raise VocabularyError(f"{self.name}: {folder}: tensor {key!r} has shape {list(shape)}; its tokenizer "
                                      f"needs {need} rows")
        if self.vocab.identity and all(shape[0] == self.vocab.rows for shape, _ in sigs.values()):
            return None
        dtype = self.dtype or np.dtype(functools.reduce(jnp.promote_types, dtypes))
        return (self.vocab.rows,) + tuple(next(iter(sigs.values()))[0][1:]), dtype

    def check_others(self, reader: Any, limit_sizes: Sequence[int]) -> None:
        """Refuse tensors outside :data:`VOCAB_TENSORS` that look vocabulary-indexed while the vocabulary changes."""
        if all(v is None for v in self.shapes.values()) and self.vocab.identity:
            return
        for key in reader.keys():
            shape, dtype = reader.shape_dtype(key)
            if key not in VOCAB_TENSORS and len(shape) >= 1 and is_floating(dtype) and shape[0] in limit_sizes:
                raise VocabularyError(f"{self.name}: tensor {key!r} (shape {list(shape)}) has as many rows as the "
                                      "vocabulary but is not a tensor mergekit re-indexes; its rows would be merged "
                                      "misaligned with the new vocabulary. Use tokenizer_source with the models' own "
                                      "tokenizer, or rename it")

    def rows(self, key: str, folder: Hashable) -> np.ndarray:
        if key not in self._cache:
            self._cache.clear()
            tensors = {f: self.by_folder[f].read_many([key])[key] for f in self.order}
            self._cache[key] = vocabulary_rows(self.vocab, tensors, self.order, self.base,
                                               self.shapes[key][1], self.name)
        return self._cache[key][folder]


class _View:
    """One slot's reader: its own tensors, the vocabulary tensors re-indexed."""

    def __init__(self, parent: VocabularyReaders, reader: Any, folder: Hashable):
        self._parent, self._reader, self._folder = parent, reader, folder
        self.vocabulary = parent.vocab

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    @property
    def inner(self) -> Any:
        """The reader this view presents (e.g. a LoRA adapter's, whose factors stay usable)."""
        return self._reader

    def changes(self, key: str) -> bool:
        """Whether ``key`` is re-indexed here (its rows then differ from :attr:`inner`'s)."""
        return self._parent.shapes.get(key) is not None

    def shape_dtype(self, key: str):
        return self._parent.shapes[key] if self.changes(key) else self._reader.shape_dtype(key)

    def read(self, key: str) -> np.ndarray:
        return self.read_many([key])[key]

    def read_many(self, keys) -> dict[str, np.ndarray]:
        keys = list(keys)
        out = self._reader.read_many([k for k in keys if not self.changes(k)])
        out.update({k: self._parent.rows(k, self._folder) for k in keys if self.changes(k)})
        return {k: out[k] for k in keys}


__all__ = ["VOCAB_TENSORS", "VocabularyReaders", "vocabulary_rows"]
