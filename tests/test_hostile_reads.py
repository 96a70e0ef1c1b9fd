"""Issue 20: no read outside a model folder (Hugging Face snapshots and refs, PEFT files, a shard
swapped for a link after its header was checked), --force never replaces what is not an earlier
output or misses a change deep inside it, and fp8 checkpoints read with ml_dtypes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.cli import main
from swudi_jax.checkpoint.io import confine, hub, output, peft
from swudi_jax.checkpoint.io.safetensors_io import SafetensorsReader

SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- do-not-echo-41c2"


def flat(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.normal(size=(4, 3)).astype(np.float32), "b.bias": rng.normal(size=(3,)).astype(np.float32)}


def test_snapshot_folder_linked_out_of_its_repo_is_refused(tmp_path, monkeypatch):
    ckio.save(tmp_path / "outside", flat(1))
    (tmp_path / "outside" / "config.json").write_text(SECRET)
    repo = tmp_path / "hub" / "models--org--evil"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).symlink_to(tmp_path / "outside")
    with pytest.raises(ckio.CheckpointError, match="outside its repository folder"):
        confine.model_root(repo / "snapshots" / ("a" * 40))
    with pytest.raises(ckio.CheckpointError, match="outside its repository folder"):
        ckio.open_checkpoint(repo / "snapshots" / ("a" * 40))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ckio.CheckpointError, match="not a snapshot inside"):
        hub.resolve("org/evil")


def opened_under(folder: Path) -> list[str]:
    """Start recording every file opened under ``folder`` (Python's audit events: ``open``,
    ``os.open``); returns the list that fills up (the hook stays for the session, recording
    only while ``folder`` exists)."""
    seen: list[str] = []
    prefix = str(folder.resolve()) + os.sep

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and folder.exists():
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(prefix):
                seen.append(path)

    sys.addaudithook(hook)
    return seen


def test_refs_main_pointing_out_of_the_cache_is_refused_and_nothing_outside_is_read(tmp_path, monkeypatch, capsys):
    """refs/main holding ../../../outside/evil names a valid checkpoint outside the cache: the run
    stops before any output with the refusal naming the refs entry, and no file outside is opened
    (not even by huggingface_hub, which reads ``trees/<ref>.json`` before returning a snapshot)."""
    outside = {k: v + 1000 for k, v in flat(1).items()}
    ckio.save(tmp_path / "outside" / "evil", outside)
    (tmp_path / "outside" / "evil" / "config.json").write_text(SECRET)
    (tmp_path / "outside" / "evil.json").write_text(SECRET)  # where huggingface_hub looks for its tree cache
    for name, seed in (("base", 0), ("e0", 2)):
        ckio.save(tmp_path / name, flat(seed))
    repo = tmp_path / "hub" / "models--org--evil"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("../../../outside/evil")
    assert (repo / "snapshots" / "../../../outside/evil" / "model.safetensors").is_file()  # a valid target
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    opened = opened_under(tmp_path / "outside")
    with pytest.raises(ckio.CheckpointError, match=r"models--org--evil/refs/main does not hold a commit hash "
                                                    r"\(it holds '../../../outside/evil'\).*refusing to follow it"):
        hub.resolve("org/evil")
    config = tmp_path / "merge.yaml"
    config.write_text(f"base_model: {tmp_path / 'base'}\nmodels: [{tmp_path / 'e0'}, org/evil]\n"
                      "merge_method: task_arithmetic\n")
    assert main([str(config), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("swudi-merge: error: config ") and "`models[1]`: Hub model 'org/evil'" in err, err
    assert "does not hold a commit hash" in err and SECRET not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and opened == []


def test_model_files_named_directly_follow_the_folder_rule(tmp_path, capsys, monkeypatch):
    """A model file named in the config is read when it resolves inside the folder holding it (a
    link within that folder, or a path through a linked folder, which is yours); a link from that
    folder to a file outside it is refused before it is opened."""
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    ckio.save(models / "base.safetensors", flat(0))
    ckio.save(models / "sub" / "e0.safetensors", flat(1))
    ckio.save(tmp_path / "outside.safetensors", {k: v + 1000 for k, v in flat(2).items()})
    (models / "e0.safetensors").symlink_to("sub/e0.safetensors")
    (models / "e1.safetensors").symlink_to("../outside.safetensors")
    (tmp_path / "linked").symlink_to(models)
    monkeypatch.chdir(tmp_path)
    opened = opened_under(tmp_path / "outside.safetensors")
    for name, entries, code in (("inside", ["linked/e0.safetensors", "models/sub/e0.safetensors"], 0),
                                ("outward", ["models/e0.safetensors", "models/e1.safetensors"], 1)):
        (tmp_path / f"{name}.yaml").write_text(f"base_model: linked/base.safetensors\nmodels: {entries}\n"
                                               "merge_method: task_arithmetic\n")
        assert main([f"{name}.yaml", f"out_{name}", "--no-progress"]) == code
    err = capsys.readouterr().err
    assert ckio.load(tmp_path / "out_inside")["a.weight"] is not None and not (tmp_path / "out_outward").exists()
    assert f"models[1]: safetensors file {models / 'e1.safetensors'} resolves to {tmp_path / 'outside.safetensors'}, " \
           f"outside the model folder {models}; refusing to open it" in err
    assert opened == []


def adapter(root: Path) -> Path:
    folder = root / "adapter"
    folder.mkdir()
    (folder / peft.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    ckio.save(folder / peft.SAFETENSORS_NAME, {"base_model.model.a.lora_A.weight": np.ones((1, 3), np.float32),
                                               "base_model.model.a.lora_B.weight": np.ones((4, 1), np.float32)})
    return folder


@pytest.mark.parametrize("name", [peft.CONFIG_NAME, peft.SAFETENSORS_NAME, peft.BIN_NAME])
def test_adapter_files_linked_outside_are_refused_before_reading(tmp_path, name):
    folder = adapter(tmp_path)
    (tmp_path / "secret.json").write_text(json.dumps({"peft_type": "LORA", "r": SECRET, "lora_alpha": 1}))
    ckio.save(tmp_path / "base", flat())
    if name == peft.BIN_NAME:
        (folder / peft.SAFETENSORS_NAME).unlink()
    else:
        (folder / name).unlink()
    (folder / name).symlink_to(tmp_path / "secret.json")
    with pytest.raises(ckio.CheckpointError, match="outside the model folder") as info:
        peft.LoraReader(ckio.open_checkpoint(tmp_path / "base"), folder)
    assert SECRET not in str(info.value)


def test_shard_swapped_for_an_outside_link_after_the_header_check_is_not_read(tmp_path):
    inside, outside = flat(0), flat(0)
    outside = {k: v + 100 for k, v in outside.items()}
    ckio.save(tmp_path / "e0", inside)
    ckio.save(tmp_path / "outside", outside)
    with SafetensorsReader(tmp_path / "e0") as reader:  # headers checked, the shard opened once
        shard = tmp_path / "e0" / "model.safetensors"
        shard.unlink()
        shard.symlink_to(tmp_path / "outside" / "model.safetensors")
        got = reader.read_many(reader.keys())
    for key, value in inside.items():
        np.testing.assert_array_equal(got[key], value)
    with pytest.raises(ckio.CheckpointError, match="outside the model folder"):  # and a new open refuses it
        SafetensorsReader(tmp_path / "e0")


def test_file_replaced_between_check_and_open_is_refused(tmp_path, monkeypatch):
    ckio.save(tmp_path / "e0", flat())
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_text(SECRET)
    shard = tmp_path / "e0" / "model.safetensors"
    real_open = os.open

    def swapping_open(path, flags, *args):  # the swap lands right after the check, before the open
        if Path(path) == shard:
            os.rename(shard, tmp_path / "e0" / "moved")
            shard.symlink_to(tmp_path / "outside" / "x")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(ckio.CheckpointError, match="replaced while it was opened|outside the model folder"):
        confine.open_file(shard, confine.model_root(shard))


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_fp8_checkpoints_read_with_their_dtype(tmp_path, dtype):
    values = np.array([[0.5, -1.0, 2.0], [0.25, 4.0, -0.125]], np.float32)
    ckio.save(tmp_path / "m", {"w": values.astype(dtype)})
    with ckio.open_checkpoint(tmp_path / "m") as reader:
        assert reader.shape_dtype("w") == ((2, 3), np.dtype(dtype))
        got = reader.read("w")
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.astype(np.float32), values)


def test_force_replaces_only_an_earlier_output_and_sees_changes_deep_inside(tmp_path):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "work" / "thesis.tex").write_text("mine")
    with pytest.raises(output.OutputError, match="not an earlier swudi-merge output"):
        output.check_output_target(home, force=True)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / output.RESULT_MARKER).write_text("{}")
    (out / "sub" / "x.txt").write_text("before")
    assert output.check_output_target(out, force=True) == out
    with output.OutputSlot(out, force=True) as slot:
        (slot.tmp / "new.txt").write_text("new")
        (out / "sub" / "x.txt").write_text("edited")  # deep inside OUT, during the run
        os.utime(out / "sub" / "x.txt", ns=(1, 1))
        with pytest.raises(output.OutputError, match="changed during the run"):
            slot.publish()
    assert (out / "sub" / "x.txt").read_text() == "edited"
