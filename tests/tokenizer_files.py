"""Small Hugging Face fast-tokenizer files written by hand (``tokenizer.json`` with a byte-level
BPE model, ``tokenizer_config.json``), for the tokenizer tests and the mergekit cross-check.

The files follow the format ``tokenizers`` and ``transformers`` read (a ``model`` with its
``vocab`` and ``merges``, an ``added_tokens`` list with each token's flags); no tokenizer
library is needed to write them.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE_VOCAB = ["<s>", "</s>", "a", "b", "c", "d", "e", "Ġ", "ab", "cd", "Ġa", "Ġb", "de", "abc", "bc", "ea"]
"""A 16-token byte-level BPE vocabulary (``<s>``/``</s>`` are also added special tokens)."""


SPECIAL = [("<s>", True), ("</s>", True)]
E0_VOCAB = BASE_VOCAB[:15] + ["ba"]
"""The base's vocabulary with ``ea`` replaced by ``ba``."""
E1_VOCAB = ["<s>", "</s>", "b", "a", "c", "d", "e", "Ġ", "ab", "cd", "Ġa", "Ġb", "de", "abc", "ba"]
"""``a``/``b`` swapped, no ``bc`` or ``ea``, ``ba``; with the added special ``<|im_start|>`` (id 15)."""


def write_three(root: Path) -> None:
    """Tokenizers for ``root/base``, ``root/e0``, ``root/e1`` whose union is deterministic in
    mergekit too: it adds ``ba`` (plain; in e0 and e1, not the base) then ``<|im_start|>``
    (e1's added special token); ``bc`` is in the base and e0, ``ea`` in the base only."""
    write_tokenizer(root / "base", BASE_VOCAB, SPECIAL)
    write_tokenizer(root / "e0", E0_VOCAB, SPECIAL)
    write_tokenizer(root / "e1", E1_VOCAB, SPECIAL + [("<|im_start|>", True)])


def added_token(content: str, token_id: int, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}


def merges_for(vocab: list[str]) -> list[list[str]]:
    """The BPE merges that build each multi-character token of ``vocab`` from two tokens in it."""
    have, out = set(vocab), []
    for token in vocab:
        if len(token) < 2 or token.startswith("<"):
            continue
        for cut in range(1, len(token)):
            if token[:cut] in have and token[cut:] in have:
                out.append([token[:cut], token[cut:]])
                break
    return out


def write_tokenizer(folder: Path, vocab: list[str], added: list[tuple[str, bool]] = (), *,
                    chat_template: str | None = None, **config_keys) -> dict[str, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``.

    Args:
      vocab: the BPE model's tokens, id = position.
      added: (content, special) added tokens: one in ``vocab`` keeps its id, others follow it.
      config_keys: more tokenizer_config.json entries.
    Returns:
      the full token → id map (the model's vocabulary and the added tokens).
    """
    folder.mkdir(parents=True, exist_ok=True)
    ids = {t: i for i, t in enumerate(vocab)}
    entries = []
    for content, special in added:
        if content not in ids:
            ids[content] = len(ids)
        entries.append(added_token(content, ids[content], special))
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges_for(vocab)},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1, ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "model_max_length": 64, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in entries}}
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(config_keys)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    return ids
