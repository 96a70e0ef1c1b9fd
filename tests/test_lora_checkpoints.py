"""swudi-merge on PEFT LoRA adapters: spectral methods from the factors, and the merge written as one adapter.

A tiny Llama (hidden 32, MLP 48, one layer, float32) with three adapters: rank 4 on every
projection, rank 8 with rsLoRA and rank/alpha patterns on every projection, rank 4 on q/v only
(so k, o and the MLP are touched by two adapters of three).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import yaml
from conftest import rel_err

import swudi_jax as sj
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.adapter_output import TRUNCATION_NAME
from swudi_jax.checkpoint.cli import main
from swudi_jax.checkpoint.config import ConfigError
from swudi_jax.checkpoint.io import peft
from swudi_jax.checkpoint.pipeline import merge_checkpoints

D, F, V = 32, 48, 64
PROJ = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (D, D), "self_attn.v_proj": (D, D),
        "self_attn.o_proj": (D, D), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
LAYERS = 1
MODULES = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in PROJ]
QV = [m for m in MODULES if m.endswith(("q_proj", "v_proj"))]
ADAPTERS = ["a1", "a2", "a3"]


def tiny_llama(rng) -> dict[str, np.ndarray]:
    flat = {"model.embed_tokens.weight": rng.normal(size=(V, D))}
    for i in range(LAYERS):
        for name, shape in PROJ.items():
            flat[f"model.layers.{i}.{name}.weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
        flat[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
    flat["model.norm.weight"] = 1 + 0.1 * rng.normal(size=D)
    flat["lm_head.weight"] = rng.normal(size=(V, D))
    return {k: v.astype(np.float32) for k, v in flat.items()}


def write_adapter(folder, base, rng, modules, config, *, transpose=False, embedding=(), replaced=None):
    """A PEFT adapter folder (PEFT's saved names) with random factors for ``modules``."""
    tensors = {}
    for m in modules:
        rows, cols = base[m + ".weight"].shape
        out_dim, in_dim = (cols, rows) if transpose else (rows, cols)
        r = next((v for k, v in config.get("rank_pattern", {}).items() if m.endswith(k)), config["r"])
        tensors[f"base_model.model.{m}.lora_A.weight"] = rng.normal(size=(r, in_dim)) / np.sqrt(in_dim)
        tensors[f"base_model.model.{m}.lora_B.weight"] = 0.05 * rng.normal(size=(out_dim, r))
    for m in embedding:
        vocab, dim = base[m + ".weight"].shape
        tensors[f"base_model.model.{m}.lora_embedding_A"] = rng.normal(size=(config["r"], vocab)) / 4
        tensors[f"base_model.model.{m}.lora_embedding_B"] = 0.05 * rng.normal(size=(dim, config["r"]))
    for name, value in (replaced or {}).items():
        tensors[f"base_model.model.{name}"] = value
    folder.mkdir()
    (folder / peft.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", **config}))
    ckio.save(folder / peft.SAFETENSORS_NAME, {k: np.asarray(v, np.float32) for k, v in tensors.items()})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    rng = np.random.default_rng(0)
    base = tiny_llama(rng)
    ckio.save(root / "base", base)
    targets = sorted(p.split(".")[-1] for p in PROJ)
    write_adapter(root / "a1", base, rng, MODULES, {"r": 4, "lora_alpha": 8, "target_modules": targets})
    write_adapter(root / "a2", base, rng, MODULES, {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": targets,
                                                    "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"v_proj": 3}})
    write_adapter(root / "a3", base, rng, QV, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    return root, base


def run(root, name, **config):
    """Merge into ``root/name`` (a merge already there under that name is the same config's: reused)."""
    config = {"base_model": "base", "models": ADAPTERS, "merge_method": "swudi", **config}
    if (root / name).exists() and (root / f"{name}.yaml").read_text() == yaml.safe_dump(config):
        return root / name
    (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return merge_checkpoints(root / f"{name}.yaml", root / name, progress=False)


def densified(root, base_name, adapters):
    """The experts as the densified path reads them (base + ΔW rounded to the base dtype)."""
    out = []
    for a in adapters:
        with peft.LoraReader(ckio.open_checkpoint(root / base_name), root / a) as reader:
            out.append(reader.read_many(reader.keys()))
    return out


def task_vector_errors(got, want, base) -> dict[str, float]:
    """‖got − want‖ relative to want's task vector, or to 1e-2·‖base‖ where that is smaller (a tensor no
    adapter touches, whose task vector is float32 rounding of the base: ~1e-7·‖base‖)."""
    out = {}
    for k in base:
        diff = np.asarray(got[k], np.float64) - np.asarray(want[k], np.float64)
        scale = max(np.linalg.norm(np.asarray(want[k], np.float64) - base[k]), 1e-2 * np.linalg.norm(base[k]))
        out[k] = float(np.linalg.norm(diff) / scale)
    return out


def recorded_reads(monkeypatch) -> list[str]:
    seen: list[str] = []
    original = peft.LoraReader.read_many

    def read_many(self, keys):
        keys = list(keys)
        seen.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(peft.LoraReader, "read_many", read_many)
    return seen


METHODS = {"swudi": {"time": 300.0, "rank_ratio": 0.85}, "swudi_a": {}, "iwudi": {"time": 50.0}, "pinv": {}}
WEIGHTS = [0.5, 1.0, 2.0]
WEIGHTED = [{"model": a, "parameters": {"weight": w}} for a, w in zip(ADAPTERS, WEIGHTS)]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_spectral_methods_merge_adapters_from_the_factors_as_the_densified_merge(llama, tmp_path, monkeypatch, method):
    """float64 compute: the factor path equals today's densified merge to 1e-5 (the densified
    experts carry float32 rounding of base + ΔW); the tensors every adapter updates are never
    read densified."""
    root, base = llama
    reads = recorded_reads(monkeypatch)
    out = run(root, f"{method}_dense", merge_method=method, models=WEIGHTED, parameters=METHODS[method],
              dtype="float64", out_dtype="float32")
    assert not {f"{m}.weight" for m in QV} & set(reads)  # every adapter updates q/v: merged from the factors
    assert {f"{m}.weight" for m in MODULES if m not in QV} <= set(reads)  # touched by two of three: densified
    monkeypatch.undo()
    with jax.enable_x64(True):
        want = sj.merge(base, densified(root, "base", ADAPTERS), method, layout="torch", dtype="float64",
                        weight=WEIGHTS, **METHODS[method])
    errors = task_vector_errors(ckio.load(out), want, base)
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda e: -e[1])[:3]


@pytest.mark.slow
def test_float32_factor_path_is_within_1e5_of_the_exact_merge(llama, tmp_path):
    """float32 compute: the factor path is within 1e-5 of the exact float64 merge of the ΔW
    (the densified float32 path solves an n×n eigenproblem whose null space is rounding noise)."""
    root, base = llama
    out = ckio.load(run(root, "dense32"))
    readers = [peft.LoraReader(ckio.open_checkpoint(root / "base"), root / a) for a in ADAPTERS]
    with jax.enable_x64(True):
        for m in QV:
            updates = [r.updates[f"{m}.weight"] for r in readers]
            exact = sj.merge_lora([(u.scaling * u.b.astype(np.float64), u.a.astype(np.float64)) for u in updates])
            assert rel_err(out[f"{m}.weight"] - base[f"{m}.weight"], exact) <= 1e-5
    for r in readers:
        r.close()


@pytest.mark.parametrize("method, dtype", [pytest.param("swudi", "float64", marks=pytest.mark.slow),
                                           ("task_arithmetic", "float32"),
                                           pytest.param("linear", "float32", marks=pytest.mark.slow)])
def test_adapter_output_reloads_to_the_dense_output(llama, method, dtype):
    """out_format peft: one adapter of rank Σ rᵢ per module (rank_pattern, α = r), whose ΔW read
    back over the base equals the dense output; swudi-merge reads it back as an expert."""
    root, base = llama
    options = {"merge_method": method, "dtype": dtype, "out_dtype": "float32"}
    if method == "swudi":  # the spectral test's config (its dense output is reused)
        options.update(models=WEIGHTED, parameters=METHODS[method])
    if method == "linear":
        options["models"] = [{"model": a, "parameters": {"weight": w}} for a, w in zip(ADAPTERS, [1.0, 2.0, 1.0])]
        options["parameters"] = {"weight": 1.0}  # the joining base's
    dense = ckio.load(run(root, f"{method}_dense", **options))
    adapter = run(root, f"{method}_adapter", out_format="peft", **options)
    assert {p.name for p in adapter.iterdir()} == {peft.CONFIG_NAME, peft.SAFETENSORS_NAME, "merge_config.yaml",
                                                    "README.md"}
    config = json.loads((adapter / peft.CONFIG_NAME).read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 16
    assert sorted(config["target_modules"]) == sorted(MODULES)
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert config["rank_pattern"]["model\\.layers\\.0\\.self_attn\\.k_proj"] == 12  # a1 + a2 (a3 does not touch it)
    assert config["rank_pattern"]["model\\.layers\\.0\\.mlp\\.down_proj"] == 8  # 4 + 4 by a2's rank_pattern
    assert "model\\.layers\\.0\\.self_attn\\.q_proj" not in config["rank_pattern"]  # 4 + 8 + 4 = r
    with peft.LoraReader(ckio.open_checkpoint(root / "base"), adapter) as reader:
        reloaded = reader.read_many(reader.keys())
        assert set(reader.updates) == {f"{m}.weight" for m in MODULES}
    errors = task_vector_errors(reloaded, dense, base)
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda e: -e[1])[:3]
    again = run(root, f"{method}_again", models=[adapter.name, "a1"], merge_method="task_arithmetic")
    a1 = densified(root, "base", ["a1"])[0]
    want = {k: reloaded[k] + (a1[k] - base[k]) for k in base}
    assert max(task_vector_errors(ckio.load(again), want, base).values()) <= 1e-5


@pytest.mark.slow
def test_truncated_adapter_error_equals_the_discarded_singular_values(llama):
    root, base = llama
    exact_dir = run(root, "exact_adapter", out_format="peft", dtype="float64", out_dtype="float32")
    cut_dir = run(root, "cut_adapter", out_format="peft", adapter_rank=6, dtype="float64", out_dtype="float32")
    config = json.loads((cut_dir / peft.CONFIG_NAME).read_text())
    assert config["r"] == 6 and not config["rank_pattern"]
    report = {e["module"]: e for e in json.loads((cut_dir / TRUNCATION_NAME).read_text())}
    assert set(report) == set(MODULES)  # every module has Σ rᵢ ≥ 8 > 6
    with peft.LoraReader(ckio.open_checkpoint(root / "base"), exact_dir) as exact, \
            peft.LoraReader(ckio.open_checkpoint(root / "base"), cut_dir) as cut:
        for m in MODULES:
            full, kept = exact.updates[f"{m}.weight"].delta(np.float64), cut.updates[f"{m}.weight"].delta(np.float64)
            s = np.linalg.svd(full, compute_uv=False)
            discarded = np.sqrt(np.sum(s[6:] ** 2))
            assert report[m]["rank"] == 6 and report[m]["exact_rank"] == exact.updates[f"{m}.weight"].a.shape[0]
            assert report[m]["error"] == pytest.approx(discarded, rel=1e-4)
            assert np.linalg.norm(full - kept) == pytest.approx(discarded, rel=1e-4)
            assert report[m]["relative_error"] == pytest.approx(discarded / np.linalg.norm(full), rel=1e-4)


def gpt2_like(rng) -> dict[str, np.ndarray]:
    """Conv1D weights stored (in, out), as GPT-2 saves them."""
    flat = {"transformer.wte.weight": rng.normal(size=(V, D))}
    for i in range(2):
        flat[f"transformer.h.{i}.attn.c_attn.weight"] = rng.normal(size=(D, 3 * D)) / np.sqrt(D)
        flat[f"transformer.h.{i}.mlp.c_fc.weight"] = rng.normal(size=(D, F)) / np.sqrt(D)
        flat[f"transformer.h.{i}.mlp.c_proj.weight"] = rng.normal(size=(F, D)) / np.sqrt(F)
    return {k: v.astype(np.float32) for k, v in flat.items()}


@pytest.mark.slow
def test_fan_in_fan_out_adapters_merge_from_factors_and_write_a_fan_in_fan_out_adapter(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    base = gpt2_like(rng)
    ckio.save(tmp_path / "base", base)
    modules = [k.removesuffix(".weight") for k in base if ".h." in k]
    for name, r in (("g1", 4), ("g2", 8)):
        write_adapter(tmp_path / name, base, rng, modules, {"r": r, "lora_alpha": 2 * r, "fan_in_fan_out": True,
                                                            "target_modules": ["c_attn", "c_fc", "c_proj"]}, transpose=True)
    reads = recorded_reads(monkeypatch)
    common = {"base_model": "base", "models": ["g1", "g2"], "merge_method": "swudi", "dtype": "float64",
              "out_dtype": "float32"}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(common))
    dense = ckio.load(merge_checkpoints(tmp_path / "d.yaml", tmp_path / "dense", progress=False))
    assert not {f"{m}.weight" for m in modules} & set(reads)
    monkeypatch.undo()
    with jax.enable_x64(True):
        want = sj.merge(base, densified(tmp_path, "base", ["g1", "g2"]), "swudi", layout="torch", dtype="float64")
    assert max(task_vector_errors(dense, want, base).values()) <= 1e-5
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**common, "out_format": "peft"}))
    adapter = merge_checkpoints(tmp_path / "a.yaml", tmp_path / "adapter", progress=False)
    config = json.loads((adapter / peft.CONFIG_NAME).read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 12
    tensors = ckio.load(adapter / peft.SAFETENSORS_NAME)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (12, D)  # (R, in)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * D, 12)  # (out, R)
    reloaded = densified(tmp_path, "base", ["adapter"])[0]
    assert max(task_vector_errors(reloaded, dense, base).values()) <= 1e-5


@pytest.mark.slow
def test_embeddings_and_modules_to_save_merge_densified_and_travel_in_the_adapter(llama, tmp_path_factory):
    root, base = llama
    rng = np.random.default_rng(4)
    head = base["lm_head.weight"] + 0.01 * rng.normal(size=base["lm_head.weight"].shape).astype(np.float32)
    write_adapter(root / "e1", base, rng, QV, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj",
                  "embed_tokens"], "modules_to_save": ["lm_head"]}, embedding=["model.embed_tokens"],
                  replaced={"lm_head.weight": head})
    options = {"models": ["a1", "e1"], "dtype": "float64", "out_dtype": "float32"}
    dense = ckio.load(run(root, "emb_dense", **options))
    with jax.enable_x64(True):
        want = sj.merge(base, densified(root, "base", ["a1", "e1"]), "swudi", layout="torch", dtype="float64")
    assert max(task_vector_errors(dense, want, base).values()) <= 1e-5
    assert rel_err(dense["lm_head.weight"] - base["lm_head.weight"], (head - base["lm_head.weight"]) / 2) <= 1e-5
    adapter = run(root, "emb_adapter", out_format="peft", **options)
    config = json.loads((adapter / peft.CONFIG_NAME).read_text())
    assert config["modules_to_save"] == ["lm_head"] and "model.embed_tokens" in config["target_modules"]
    tensors = ckio.load(adapter / peft.SAFETENSORS_NAME)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, V)
    assert "base_model.model.lm_head.weight" in tensors
    reloaded = densified(root, "base", ["emb_adapter"])[0]
    assert max(task_vector_errors(reloaded, dense, base).values()) <= 1e-5


@pytest.mark.parametrize("change, message", [
    ({"merge_method": "ties", "parameters": {"density": 0.5}}, "not in the adapters' span"),
    ({"models": ["a1", "other+a2"]}, "every model must be a PEFT adapter over that base"),
    ({"merge_method": "linear", "models": [{"model": "a1", "parameters": {"weight": 0.5}},
                                           {"model": "a2", "parameters": {"weight": 0.7}}],
      "parameters": {"weight": 1.0, "normalize": False}}, "do not sum to 1"),
])
def test_merges_that_are_not_an_adapter_are_refused_before_any_output(llama, change, message):
    root, base = llama
    if not (root / "other").exists():
        ckio.save(root / "other", {k: v + 0.01 for k, v in base.items()})
    with pytest.raises(ValueError, match=message):
        run(root, "refused", out_format="peft", **change)
    assert not (root / "refused").exists()


def test_adapter_rank_needs_out_format_peft_and_a_positive_integer(llama):
    root, _ = llama
    for extra, message in (({"adapter_rank": 4}, "needs `out_format: peft`"),
                           ({"adapter_rank": 0, "out_format": "peft"}, "positive integer")):
        with pytest.raises(ConfigError, match=message):
            run(root, "bad_rank", **extra)


@pytest.mark.slow
def test_command_line_writes_a_truncated_adapter(llama, capsys):
    root, _ = llama
    (root / "cli.yaml").write_text(yaml.safe_dump({"base_model": "base", "models": ADAPTERS, "merge_method": "swudi"}))
    code = main([str(root / "cli.yaml"), str(root / "cli_out"), "--out-adapter", "--adapter-rank", "10", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "truncated to rank <= 10" in capsys.readouterr().err
    assert json.loads((root / "cli_out" / peft.CONFIG_NAME).read_text())["r"] == 10
