"""`swudi-merge` and merge_checkpoints: on-disk merges equal in-memory merges, outputs are
complete or absent, inputs are never touched, and every bad input gets one clear line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from conftest import experts_of, snapshot

import swudi_jax.checkpoint.pipeline as checkpoint_merge
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.pipeline import CONFIG_NAME, merge_checkpoints
from swudi_jax.checkpoint.cli import main
from swudi_jax.model.merger import merge


def hf_model(rng, dtype=np.float32) -> dict[str, np.ndarray]:
    """A tiny HF-layout model: torch (out, in) weights, norms, an embedding and a head."""
    flat = {}
    for layer in range(2):
        for name in ("q_proj", "v_proj"):
            flat[f"model.layers.{layer}.self_attn.{name}.weight"] = rng.normal(size=(8, 8))
        flat[f"model.layers.{layer}.mlp.up_proj.weight"] = rng.normal(size=(12, 8))
        flat[f"model.layers.{layer}.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(8,))
    flat["model.embed_tokens.weight"] = rng.normal(size=(20, 8))
    flat["lm_head.weight"] = rng.normal(size=(20, 8))
    out = {k: v.astype(dtype) for k, v in flat.items()}
    out["model.position_ids"] = np.arange(6, dtype=np.int64)
    return out


@pytest.fixture
def on_disk(tmp_path):
    """Base + 3 experts as sharded HF safetensors directories, and a config writer."""
    rng = np.random.default_rng(0)
    base = hf_model(rng)
    experts = experts_of(base, rng)
    ckio.save(tmp_path / "base", base, shard_size=1500)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    for i, e in enumerate(experts):
        ckio.save(tmp_path / f"e{i}", e, shard_size=1500)

    def config(**extra):
        content = {"base_model": "base", "models": ["e0", "e1", "e2"], "merge_method": "swudi", **extra}
        path = tmp_path / "merge.yaml"
        path.write_text(yaml.safe_dump(content))
        return path

    return tmp_path, base, experts, config


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def assert_close_trees(got: dict, want: dict, rtol=1e-5, atol=1e-6):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == np.asarray(want[key]).dtype, key
        np.testing.assert_allclose(np.asarray(got[key], np.float64), np.asarray(want[key], np.float64),
                                   rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("method, parameters", [
    ("swudi", {}), ("ties_paper", {"density": 0.3}), ("task_arithmetic_paper", {}),
])
def test_streamed_merge_equals_the_in_memory_merge(on_disk, method, parameters):
    root, base, experts, config = on_disk
    out = merge_checkpoints(config(merge_method=method, parameters=parameters, exclude=["*embed_tokens*"],
                                   out_shard_size=1000), root / "out", progress=False, max_group_bytes=4000)
    want = merge(base, experts, method, layout="torch", exclude=["*embed_tokens*"], **parameters)
    assert_close_trees(ckio.load(out), want)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / ckio.safetensors_io.INDEX_NAME).is_file()


def test_output_has_weights_side_files_resolved_config_and_model_card(on_disk):
    root, _, _, config = on_disk
    assert main([str(config(parameters={"time": 5.0})), str(root / "out"), "--no-progress"]) == 0
    out = root / "out"
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama"}
    assert (out / "tokenizer.json").is_file()
    resolved = yaml.safe_load((out / CONFIG_NAME).read_text())
    assert resolved["merge_method"] == "swudi" and resolved["parameters"]["time"] == 5.0
    assert resolved["models"] == ["e0", "e1", "e2"] and resolved["base_model"] == "base"  # as the config wrote them
    card = (out / "README.md").read_text()
    assert "arxiv.org/abs/2606.07289" in card and "- **Base model:** `base`" in card and "`time` | `5.0`" in card
    assert "**compute dtype:** float32 (float64 for float64 tensors)" in card  # swudi on float32 tensors
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"base_model": "base", "library_name": "transformers",
                     "tags": ["mergekit", "merge", "swudi_jax", "swudi"]}  # mergekit's tags: the Hub sees a merge
    assert (out / "mergekit_config.yml").read_text() == (root / "merge.yaml").read_text()  # as mergekit writes it
    for written in out.iterdir():  # no absolute path of this machine anywhere in the text files
        if written.suffix in (".md", ".yaml", ".json"):
            assert str(root) not in written.read_text() and str(root.resolve()) not in written.read_text(), written
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())
    assert sorted(p.name for p in root.iterdir()) == ["base", "e0", "e1", "e2", "merge.yaml", "out"]


@pytest.mark.parametrize(("method", "asked", "card"), [
    ("swudi", None, "float32 (float64 for float64 tensors)"),
    ("swudi", "bfloat16", "float32 (config: bfloat16; swudi is not defined in it)"),
    ("swudi", "float64", "float64"), ("ties", None, "as stored"), ("ties", "bfloat16", "bfloat16")])
def test_the_model_card_names_the_dtype_the_method_computes_in(method, asked, card):
    from swudi_jax.checkpoint.output_files import _compute_dtype
    from swudi_jax.methods.registry import get_method

    assert _compute_dtype(get_method(method), asked) == card


def test_bf16_checkpoints_merge_in_float32_and_stay_bf16(tmp_path):
    rng = np.random.default_rng(1)
    base = hf_model(rng, ml_dtypes.bfloat16)
    experts = experts_of(base, rng, 2)
    for name, model in [("base.safetensors", base), ("a.safetensors", experts[0]), ("b.safetensors", experts[1])]:
        ckio.save(tmp_path / name, model)
    cfg = {"base_model": "base.safetensors", "models": ["a.safetensors", "b.safetensors"], "merge_method": "average"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    got = ckio.load(merge_checkpoints(tmp_path / "m.yaml", tmp_path / "out", progress=False))
    assert_close_trees(got, merge(base, experts, "average", layout="torch"))
    assert got["lm_head.weight"].dtype == ml_dtypes.bfloat16
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({**cfg, "out_dtype": "float32"}))
    got32 = ckio.load(merge_checkpoints(tmp_path / "m.yaml", tmp_path / "out32", progress=False))
    assert got32["lm_head.weight"].dtype == np.float32 and got32["model.position_ids"].dtype == np.int64


@pytest.mark.parametrize("fmt, target", [("orbax", "ck"), ("msgpack", "m.msgpack"), ("npz", "m.npz")])
def test_flax_checkpoints_in_every_format_merge_like_the_pytree(tmp_path, fmt, target):
    rng = np.random.default_rng(2)
    base = {"params/Dense_0/kernel": rng.normal(size=(6, 4)).astype(np.float32),
            "params/Dense_0/bias": rng.normal(size=(4,)).astype(np.float32),
            "params/Dense_1/kernel": rng.normal(size=(4, 6)).astype(np.float32)}
    experts = experts_of(base, rng, 2)
    names = []
    for name, model in [("base", base), ("a", experts[0]), ("b", experts[1])]:
        ckio.save(tmp_path / f"{name}_{target}", model, fmt)
        names.append(f"{name}_{target}")
    cfg = {"base_model": names[0], "models": names[1:], "merge_method": "swudi", "out_format": "safetensors"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    got = ckio.load(merge_checkpoints(tmp_path / "m.yaml", tmp_path / "out", progress=False))
    assert_close_trees(got, merge(base, experts, "swudi", layout="flax"))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({**cfg, "out_format": "auto"}))
    again = merge_checkpoints(tmp_path / "m.yaml", tmp_path / "out2", progress=False)
    assert ckio.detect_format(ckio.weights_path(again, fmt)) == fmt
    assert_close_trees(ckio.load(ckio.weights_path(again, fmt)), got, rtol=0, atol=0)


def test_dry_run_prints_the_plan_and_writes_nothing(on_disk, capsys):
    root, _, _, config = on_disk
    assert main([str(config(exclude="*embed_tokens*")), str(root / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith(("model.", "lm_head"))}
    assert rows["model.layers.0.self_attn.q_proj.weight"][3:5] == ["linear", "swudi"]
    assert rows["lm_head.weight"][3:5] == ["mean", "mean"]
    assert rows["model.embed_tokens.weight"][3:5] == ["keep", "base"]
    assert rows["model.position_ids"][3:5] == ["passthrough", "copy"]
    assert not (root / "out").exists()
    assert main([str(config(head_patterns=["*up_proj*"], others="keep")), str(root / "out"), "--dry-run"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("model.", "lm_head"))}
    assert rows["lm_head.weight"][3:5] == ["linear", "swudi"]
    assert rows["model.layers.1.mlp.up_proj.weight"][3:5] == ["keep", "base"]
    assert rows["model.layers.0.input_layernorm.weight"][3:5] == ["keep", "base"]


def test_existing_output_is_refused_unless_forced(on_disk, capsys):
    root, _, _, config = on_disk
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    assert main([str(config(merge_method="average")), str(root / "out"), "--no-progress"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (root / "out").iterdir()] == ["keep.txt"]
    assert main([str(config(merge_method="average")), str(root / "out"), "--no-progress", "--force"]) == 1
    assert "is not an earlier swudi-merge output" in capsys.readouterr().err  # a folder of the user's: never replaced
    assert [p.name for p in (root / "out").iterdir()] == ["keep.txt"]
    (root / "out" / "keep.txt").unlink()
    assert main([str(config(merge_method="average")), str(root / "out"), "--no-progress"]) == 0  # empty: used
    (root / "out" / "extra.txt").write_text("left by the earlier run")
    assert main([str(config(merge_method="swudi")), str(root / "out"), "--no-progress", "--force"]) == 0
    assert not (root / "out" / "extra.txt").exists() and (root / "out" / CONFIG_NAME).is_file()


def break_expert_keys(root, experts):
    e = dict(experts[1])
    e["model.extra.weight"] = np.ones((2, 2), np.float32)
    ckio.save(root / "e1", e, force=True)


def break_expert_shape(root, experts):
    e = dict(experts[1])
    e["lm_head.weight"] = np.ones((21, 8), np.float32)
    ckio.save(root / "e1", e, force=True)


def break_expert_dtype(root, experts):
    e = dict(experts[1])
    e["model.position_ids"] = e["model.position_ids"].astype(np.int32)  # float dtypes may differ (cast), ints not
    ckio.save(root / "e1", e, force=True)


def break_expert_nan(root, experts):
    e = dict(experts[1])  # in the last group, so earlier groups are already merged when it fails
    e["lm_head.weight"] = e["lm_head.weight"].copy()
    e["lm_head.weight"][3, 4] = np.nan
    ckio.save(root / "e1", e, force=True)


def truncate_expert(root, experts):
    shard = sorted((root / "e1").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-16])


@pytest.mark.parametrize("damage, cfg, message", [
    (break_expert_keys, {}, r"e1: tensor names differ from the base .*extra \['model.extra.weight'\]"),
    (break_expert_shape, {}, r"e1: tensor 'lm_head.weight' has shape \[21, 8\], the base has \[20, 8\]"),
    (break_expert_dtype, {}, r"e1: tensor 'model.position_ids' has dtype int32, the base has int64"),
    (break_expert_nan, {}, r"e1: tensor 'lm_head.weight' contains 1 NaN/Inf value\(s\); first at index \(3, 4\)"),
    (truncate_expert, {}, r"models\[1\]: .*e1/model-0000.-of-0000.\.safetensors: .*(unreadable or truncated|\(truncated\?\))"),
    (None, {"models": ["e0"]}, r"`models` needs at least two experts"),
    (None, {"merge_method": "tie"}, r"unknown merge method 'tie'"),
    (None, {"parameters": {"densty": 0.5}}, r"unknown option\(s\) \['densty'\].*'swudi'"),
])
def test_bad_input_gets_one_clear_line_and_leaves_no_output(on_disk, capsys, damage, cfg, message):
    root, _, experts, config = on_disk
    if damage is not None:
        damage(root, experts)
    cfg_path = config(**cfg)
    before = snapshot(root)
    code = main([str(cfg_path), str(root / "out"), "--no-progress", "--max-group-size", "4000"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("swudi-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (root / "out").exists()
    assert sorted(p.name for p in root.iterdir()) == ["base", "e0", "e1", "e2", "merge.yaml"]
    assert snapshot(root) == before


def test_interrupt_mid_merge_leaves_no_output_and_inputs_untouched(on_disk, monkeypatch, capsys):
    root, _, _, config = on_disk
    cfg = config(merge_method="average")
    before = snapshot(root)
    real, calls = checkpoint_merge.merge_group, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_merge, "merge_group", interrupted)
    assert main([str(cfg), str(root / "out"), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err and len(calls) == 3
    assert not (root / "out").exists() and snapshot(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["base", "e0", "e1", "e2", "merge.yaml"]


def test_console_script_runs_in_a_subprocess(on_disk):
    root, _, _, config = on_disk
    script = Path(sys.executable).parent / "swudi-merge"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "swudi_jax.checkpoint.cli"]
    done = subprocess.run([*command, str(config(merge_method="average")), str(root / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert "merged checkpoint written to" in done.stdout and (root / "out" / "README.md").is_file()


def test_damaged_orbax_expert_is_reported_before_any_output(tmp_path, capsys):
    rng = np.random.default_rng(3)
    base = {"params/Dense_0/kernel": rng.normal(size=(4, 4)).astype(np.float32)}
    for name, model in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts_of(base, rng, 2)))]:
        ckio.save(tmp_path / name, model, "orbax")
    for item in (tmp_path / "e1").rglob("*"):
        if item.is_file() and item.name != "_CHECKPOINT_METADATA":
            item.write_bytes(item.read_bytes()[:5])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"base_model": "base", "models": ["e0", "e1"],
                                                     "merge_method": "swudi"}))
    assert main([str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"models\[1\]: .*e1: unreadable or truncated orbax checkpoint", err), err
    assert not (tmp_path / "out").exists()


def test_sigterm_mid_merge_removes_the_partial_output(tmp_path):
    rng = np.random.default_rng(4)
    base = {f"model.layers.{i}.mlp.weight": rng.normal(size=(8 + i, 8)).astype(np.float32) for i in range(40)}
    for name, model in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts_of(base, rng, 2)))]:
        ckio.save(tmp_path / name, model)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"base_model": "base", "models": ["e0", "e1"],
                                                     "merge_method": "swudi"}))
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "swudi_jax.checkpoint.cli", str(tmp_path / "m.yaml"), str(tmp_path / "out"),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    while proc.poll() is None and not list(tmp_path.glob(".out.*.tmp/model.safetensors")):
        time.sleep(0.02)  # wait until the output file is being written (40 groups of distinct shapes to go)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM, the shell's convention
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "e0", "e1", "m.yaml"]
    assert snapshot(tmp_path) == before
