"""mergekit's tokenizer settings: the output vocabulary (``tokenizer_source: union``/``base``/a
model, the ``tokenizer:`` block with ``tokens`` and ``pad_to_multiple_of``), each model's
embedding and head rows re-indexed to it, the bundled chat templates, and the refusals.
Rows are checked against a plain transcription of mergekit's rules written here."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import yaml
from mergekit_checkpoints import VOCAB, f64, family, run
from tokenizer_files import BASE_VOCAB, E0_VOCAB, E1_VOCAB, SPECIAL, write_three, write_tokenizer

from swudi_jax.checkpoint import chat_templates
from swudi_jax.checkpoint.config import ConfigError, load_config
from swudi_jax.checkpoint.io import CheckpointError

ROWS = ("model.embed_tokens.weight", "lm_head.weight")
VOCABS = {"base": BASE_VOCAB, "e0": E0_VOCAB, "e1": E1_VOCAB + ["<|im_start|>"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabulary")
    m = family(root, n_experts=2, seed=5)
    write_three(root)
    return root, {k: f64(v) for k, v in m.items()}


def write(root, name, config):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def token_ids(folder) -> dict[str, int]:
    content = json.loads((folder / "tokenizer.json").read_text())
    ids = dict(content["model"]["vocab"])
    ids.update({e["content"]: e["id"] for e in content["added_tokens"]})
    return ids


def reference_rows(m, name, out_tokens, order, base, tokens=None):
    """mergekit's rule per token and model, transcribed: own row unless forced; else the
    token's source, the one model that has it, the base, or the mean of those that have it."""
    tokens = tokens or {}
    ids = {k: {t: i for i, t in enumerate(VOCABS[k])} for k in order}
    out = {k: np.zeros((len(out_tokens),) + m[k][name].shape[1:]) for k in order}
    for new, token in enumerate(out_tokens):
        have = [k for k in order if token in ids[k]]
        cfg = tokens.get(token, {})
        source = cfg.get("source")
        if source == "zero":
            default = 0.0
        elif isinstance(source, tuple):  # (model, its token)
            default = m[source[0]][name][ids[source[0]][source[1]]]
        elif isinstance(source, str):
            default = m[source][name][ids[source][token]]
        elif len(have) == 1:
            default = m[have[0]][name][ids[have[0]][token]]
        elif base in have:
            default = m[base][name][ids[base][token]]
        else:
            default = np.mean([m[k][name][ids[k][token]] for k in have], axis=0) if have else 0.0
        for k in order:
            own = token in ids[k] and not cfg.get("force")
            out[k][new] = m[k][name][ids[k][token]] if own else default
    return out


def test_union_adds_the_missing_tokens_and_reindexes_every_models_rows(models):
    root, m = models
    config = {"models": [{"model": "e0", "parameters": {"weight": 0.6}}, {"model": "e1", "parameters": {"weight": 0.3}}],
              "base_model": "base", "merge_method": "task_arithmetic", "tokenizer_source": "union",
              "dtype": "float32"}
    got = run(root, config, "union")
    ids = token_ids(root / "union")
    out_tokens = BASE_VOCAB + ["ba", "<|im_start|>"]
    assert ids == {t: i for i, t in enumerate(out_tokens)}  # base ids, then the union's additions in order
    added = json.loads((root / "union" / "tokenizer.json").read_text())["added_tokens"]
    assert [(e["content"], e["id"], e["special"], e["normalized"]) for e in added] == [
        ("<s>", 0, True, False), ("</s>", 1, True, False), ("ba", 16, False, True), ("<|im_start|>", 17, True, False)]
    assert json.loads((root / "union" / "config.json").read_text())["vocab_size"] == 18
    decoder = json.loads((root / "union" / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder["17"]["content"] == "<|im_start|>"
    for name in ROWS:
        rows = reference_rows(m, name, out_tokens, ["e0", "e1", "base"], "base")
        want = rows["base"] + 0.6 * (rows["e0"] - rows["base"]) + 0.3 * (rows["e1"] - rows["base"])
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    for name in m["base"]:
        if name not in ROWS:
            want = m["base"][name] + 0.6 * (m["e0"][name] - m["base"][name]) + 0.3 * (m["e1"][name] - m["base"][name])
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_tokens_sources_force_and_padding_in_bf16(models):
    root, m = models
    tokens = {"ce": {"source": {"kind": "zero"}},
              "ab": {"source": {"kind": "model_token", "model": "e0", "token": "cd"}, "force": True},
              "<|im_start|>": {"source": "e1", "force": True}}
    config = {"models": ["e0", "e1"], "merge_method": "linear", "base_model": "base", "dtype": "bfloat16",
              "tokenizer": {"source": "union", "tokens": tokens, "pad_to_multiple_of": 8}}
    got = run(root, config, "tokens")
    out_tokens = BASE_VOCAB + ["ba", "<|im_start|>", "ce"]
    assert token_ids(root / "tokens") == {t: i for i, t in enumerate(out_tokens)}
    assert json.loads((root / "tokens" / "config.json").read_text())["vocab_size"] == 24
    ref_tokens = {"ce": {"source": "zero"}, "ab": {"source": ("e0", "cd"), "force": True},
                  "<|im_start|>": {"source": "e1", "force": True}}
    bf = {k: {n: np.asarray(np.asarray(v, np.float32).astype(ml_dtypes.bfloat16), np.float64) for n, v in f.items()}
          for k, f in m.items()}
    for name in ROWS:
        rows = reference_rows(bf, name, out_tokens, ["e0", "e1", "base"], "base", ref_tokens)
        pad = {k: np.vstack([r, np.repeat(r.mean(axis=0, keepdims=True), 24 - len(r), axis=0)]) for k, r in rows.items()}
        want = (pad["e0"] + pad["e1"] + pad["base"]) / 3  # linear: the base joins the inputs
        assert got[name].dtype == ml_dtypes.bfloat16 and got[name].shape == (24, m["base"][name].shape[1])
        np.testing.assert_allclose(np.asarray(got[name], np.float64), want, rtol=2 ** -7, atol=2 ** -9, err_msg=name)
        assert not np.any(np.asarray(got[name], np.float64)[out_tokens.index("ce")])  # in no model: zero rows


def test_tokenizer_source_base_reindexes_a_model_whose_ids_differ(models, tmp_path):
    root, m = models
    config = {"models": [{"model": "e1", "parameters": {"weight": 1.0}}], "base_model": "base",
              "merge_method": "task_arithmetic", "tokenizer_source": "base", "dtype": "float32"}
    got = run(root, config, "as_base")
    assert token_ids(root / "as_base") == token_ids(root / "base")
    for name in ROWS:
        rows = reference_rows(m, name, BASE_VOCAB, ["e1", "base"], "base")
        np.testing.assert_allclose(got[name], rows["e1"], rtol=1e-6, atol=1e-6, err_msg=name)  # a: e1's row 3


def test_base_without_base_model_is_the_first_listed_model_with_a_warning(models):
    root, m = models
    config = {"models": ["e1", "e0"], "merge_method": "karcher", "tokenizer_source": "base", "dtype": "float32"}
    with pytest.warns(UserWarning, match=r"no base_model, and the models' tokenizers differ.*first listed"):
        run(root, config, "first")
    assert token_ids(root / "first") == {t: i for i, t in enumerate(E1_VOCAB + ["<|im_start|>"])}


def test_identical_vocabularies_keep_the_tensors_and_copy_the_source_tokenizer(tmp_path):
    m = family(tmp_path, n_experts=2, seed=6)
    config = {"models": ["e0", "e1"], "base_model": "base", "merge_method": "ties", "tokenizer_source": "e1",
              "dtype": "float32"}
    got = run(tmp_path, config, "same")
    assert json.loads((tmp_path / "same" / "tokenizer_config.json").read_text())["name"] == "e1"
    assert got["model.embed_tokens.weight"].shape == m["base"]["model.embed_tokens.weight"].shape == (VOCAB, 8)


@pytest.mark.parametrize("tokenizer, message", [
    ({"source": "union", "tokens": {"zz": {"force": True}}}, r"`tokenizer.tokens\['zz'\]` needs a `source`"),
    ({"source": "union", "tokens": {"zz": {"source": "elsewhere"}}}, r"takes its row from .*elsewhere.*not one of"),
    ({"source": "union", "tokens": {"zz": {"source": {"kind": "model_token", "model": "e0", "token": "nope"}}}},
     r"e0 has no token 'nope'"),
])
def test_tokens_without_a_usable_source_are_refused(models, tokenizer, message):
    root, _ = models
    (root / "elsewhere").mkdir(exist_ok=True)
    config = {"models": ["e0", "e1"], "base_model": "base", "merge_method": "ties", "tokenizer": tokenizer}
    with pytest.raises(CheckpointError, match=message):
        run(root, config, "refused")
    assert not (root / "refused").exists()


def test_settings_and_files_mergekit_cannot_use_are_refused(models, tmp_path):
    root, _ = models
    base = {"models": ["e0", "e1"], "base_model": "base", "merge_method": "ties"}
    for tokenizer, message in [({"source": "union", "tokens": {"x": {"source": {"kind": "model_token", "model": "e0"}}}},
                                r"give one of `token` and `token_id`"),
                               ({"source": "union", "pad_to_multiple_of": 0}, r"must be a positive integer"),
                               ({"source": "union", "extra": 1}, r"takes `source`, `tokens` and `pad_to_multiple_of`")]:
        with pytest.raises(ConfigError, match=message):
            load_config(write(root, "bad", {**base, "tokenizer": tokenizer}))
    slow = family(tmp_path, n_experts=2, seed=7)
    assert slow
    (tmp_path / "e0" / "tokenizer.json").unlink()
    (tmp_path / "e0" / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match=r"e0: has tokenizer.model but no tokenizer.json"):
        run(tmp_path, {**base, "tokenizer_source": "union"}, "slow")


def test_a_tensor_with_vocabulary_rows_mergekit_does_not_reindex_is_refused(tmp_path):
    from mergekit_checkpoints import llama, save_model

    rng = np.random.default_rng(8)
    for name, vocab, added in (("base", BASE_VOCAB, SPECIAL), ("e0", E0_VOCAB, SPECIAL)):
        flat = {**llama(rng), "model.extra_embed.weight": rng.normal(size=(VOCAB, 8)).astype(np.float32)}
        save_model(tmp_path / name, flat)
        write_tokenizer(tmp_path / name, vocab, added)
    config = {"models": ["e0"], "base_model": "base", "merge_method": "task_arithmetic", "tokenizer_source": "union"}
    with pytest.raises(CheckpointError, match=r"'model.extra_embed.weight' \(shape \[16, 8\]\) has as many rows"):
        run(tmp_path, config, "extra")


# ----------------------------------------------------------------------------- chat templates


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
RENDERED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Instruction:\nBye\n\n### Response:\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nBye</s>\n<|assistant|>\n",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n[|user|]Bye\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(chat_templates.BUNDLED))
def test_bundled_chat_templates_render_their_format(name):
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    text = env.from_string(chat_templates.BUNDLED[name]).render(
        messages=CONVERSATION, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert text == RENDERED[name]


def test_a_chat_template_name_is_written_into_the_tokenizer_config(models):
    root, _ = models
    config = {"models": ["e0", "e1"], "base_model": "base", "merge_method": "ties", "chat_template": "chatml"}
    run(root, config, "chat")
    assert json.loads((root / "chat" / "tokenizer_config.json").read_text())["chat_template"] == \
        chat_templates.BUNDLED["chatml"]


def test_a_tokenizer_with_slices_runs_when_every_vocabulary_agrees_and_is_refused_otherwise(tmp_path):
    """mergekit's slerp model cards write ``tokenizer_source: base`` beside ``slices:``: with the
    models sharing the base's vocabulary the rows stay as they are and the output gets the base's
    tokenizer; with vocabularies that differ the rows would be re-indexed per slice (not built):
    refused before anything is written, naming both keys."""
    family(tmp_path, n_experts=1, seed=7)
    for name in ("base", "e0"):
        write_tokenizer(tmp_path / name, BASE_VOCAB, SPECIAL)
    config = {"slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "e0", "layer_range": [0, 2]}]}],
              "base_model": "base", "merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32",
              "tokenizer_source": "base"}
    out = run(tmp_path, config, "same_out")
    assert token_ids(tmp_path / "same_out") == token_ids(tmp_path / "base")
    plain = run(tmp_path, {k: v for k, v in config.items() if k != "tokenizer_source"}, "plain_out")
    assert set(out) == set(plain) and all(np.array_equal(out[k], plain[k]) for k in out)
    write_tokenizer(tmp_path / "e0", E0_VOCAB, SPECIAL)
    with pytest.raises(CheckpointError, match=r"`tokenizer_source` with `slices`/`modules` needs the models' "
                                              r"vocabularies to agree"):
        run(tmp_path, config, "differ_out")
    assert not (tmp_path / "differ_out").exists()
