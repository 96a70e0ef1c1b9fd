"""`swudi-merge` cannot be turned against its user (issue 10): confinement of every file read,
allow-listed side files, an output that is never someone else's, finite outputs, clean faults,
relative paths in what is published, and byte-identical results across processes.

Each test builds small BERT-like checkpoints (a few KB). Subprocesses only where a signal, a
resource limit or a second process is the point."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import experts_of, snapshot

import swudi_jax.checkpoint.pipeline as checkpoint_merge
from swudi_jax.methods import registry
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.pipeline import CONFIG_NAME, merge_checkpoints
from swudi_jax.checkpoint.cli import main
from swudi_jax.checkpoint.io import confine, output, safetensors_io
from swudi_jax.checkpoint.io.output import OutputSlot
from swudi_jax.model.merger import merge

SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- do-not-publish-7f3a9c"
RANDOM_METHODS = [m for m in registry.available_methods() if "seed" in registry.get_method(m).defaults
                  and registry.get_method(m).n_experts[0] <= 2 and registry.get_method(m).n_experts[1] in (None, 2)]
"""Methods with randomness (a ``seed`` option): DARE today, the mergekit random sparsifiers when registered."""


# ----------------------------------------------------------------------------- helpers


def bert_like(rng, hidden: int = 8, layers: int = 2, vocab: int = 16) -> dict[str, np.ndarray]:
    """A tiny BERT-shaped model in the HF torch layout (about 5 KB in float32)."""
    flat = {"bert.embeddings.word_embeddings.weight": rng.normal(size=(vocab, hidden)),
            "bert.embeddings.LayerNorm.weight": 1 + 0.1 * rng.normal(size=(hidden,)),
            "bert.embeddings.LayerNorm.bias": 0.1 * rng.normal(size=(hidden,))}
    for layer in range(layers):
        p = f"bert.encoder.layer.{layer}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            flat[p + name + ".weight"] = rng.normal(size=(hidden, hidden))
            flat[p + name + ".bias"] = 0.1 * rng.normal(size=(hidden,))
        flat[p + "intermediate.dense.weight"] = rng.normal(size=(2 * hidden, hidden))
        flat[p + "output.dense.weight"] = rng.normal(size=(hidden, 2 * hidden))
    out = {k: v.astype(np.float32) for k, v in flat.items()}
    out["bert.embeddings.position_ids"] = np.arange(6, dtype=np.int64)
    return out


def write_config(root: Path, name: str = "merge.yaml", **content) -> Path:
    content = {"base_model": "base", "models": ["e0", "e1"], "merge_method": "task_arithmetic", **content}
    path = root / name
    path.write_text(yaml.safe_dump(content))
    return path


def make_models(root: Path, *, size: float = 0.05, seed: int = 0, side_files: bool = True, shard_size=None):
    rng = np.random.default_rng(seed)
    base = bert_like(rng)
    experts = experts_of(base, rng, 2, size)
    ckio.save(root / "base", base, shard_size=shard_size)
    if side_files:
        (root / "base" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (root / "base" / "tokenizer.json").write_text("{}")
    for i, e in enumerate(experts):
        ckio.save(root / f"e{i}", e, shard_size=shard_size)
    return base, experts


def make_slow_models(root: Path, method: str = "swudi", n: int = 40) -> None:
    """n tensors of distinct shapes: n compiled groups, so a subprocess run lasts a few seconds."""
    rng = np.random.default_rng(4)
    base = {f"model.layers.{i}.mlp.weight": rng.normal(size=(8 + i, 8)).astype(np.float32) for i in range(n)}
    for name, model in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts_of(base, rng, 2)))]:
        ckio.save(root / name, model)
    write_config(root, merge_method=method)


def leftovers(root: Path) -> list[str]:
    """Temporary folders and lock files of swudi-merge next to outputs."""
    return sorted(p.name for p in root.iterdir() if output.TAG in p.name)


def run_cli(*args) -> list[str]:
    return [sys.executable, "-m", "swudi_jax.checkpoint.cli", *map(str, args), "--no-progress"]


def cli_env(**extra) -> dict[str, str]:
    tree = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": tree + (os.pathsep + path if path else ""), **extra}


def wait_for_temporary(root: Path, proc: subprocess.Popen, pattern: str = ".out.swudi-merge.*.tmp/model.safetensors"):
    deadline = time.monotonic() + 120
    while proc.poll() is None and not list(root.glob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the merge finished before the test could interrupt it"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("swudi-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def text_under(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- 1. side files


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "special_tokens_map.json"])
def test_listed_side_file_linked_to_an_outside_secret_is_refused_and_never_copied(tmp_path, capsys, name):
    make_models(tmp_path)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "id_rsa").write_text(SECRET)
    (tmp_path / "base" / name).unlink(missing_ok=True)
    (tmp_path / "base" / name).symlink_to(tmp_path / "private" / "id_rsa")
    cfg = write_config(tmp_path)
    before = snapshot(tmp_path)
    assert main([str(cfg), str(tmp_path / "out"), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert f"side file {tmp_path / 'base' / name} resolves to" in err and "outside the model folder" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before


def test_unlisted_files_and_links_are_not_copied_and_side_files_get_normal_modes(tmp_path):
    make_models(tmp_path)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "id_rsa").write_text(SECRET)
    base = tmp_path / "base"
    (base / "secret.txt").symlink_to(tmp_path / "private" / "id_rsa")  # not a known side file: ignored
    (base / "notes.txt").write_text("private notes")
    (base / "README.md").write_text("the base's own card")
    (base / "tokenizer_config.json").write_text("{}")
    os.chmod(base / "tokenizer_config.json", 0o600)  # copied with default permissions, not the source's
    # sentence-transformers: modules.json and the sub-folders it lists
    (base / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        {"idx": 3, "name": "3", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]))
    (base / "0_Transformer").mkdir()  # old layout: the base's weights there would shadow the merge
    (base / "0_Transformer" / "config.json").write_text("{}")
    (base / "config_sentence_transformers.json").write_text("{}")
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8}))
    (base / "2_Normalize").mkdir()
    (base / "3_Unlisted").mkdir()
    (base / "3_Unlisted" / "x.json").write_text("{}")
    umask = os.umask(0o022)
    try:
        assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 0
    finally:
        os.umask(umask)
    out = tmp_path / "out"
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert names == ["1_Pooling", "1_Pooling/config.json", "2_Normalize", "README.md", "config.json",
                     "config_sentence_transformers.json", CONFIG_NAME, "mergekit_config.yml", "model.safetensors",
                     "modules.json", "tokenizer.json", "tokenizer_config.json"]
    assert SECRET not in text_under(out) and "private notes" not in text_under(out)
    assert "the base's own card" not in (out / "README.md").read_text()
    for p in [out, *out.rglob("*")]:
        assert not p.is_symlink()
        want = 0o755 if p.is_dir() else 0o644
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["library_name"] == "sentence-transformers"


def test_module_folder_linked_outside_is_refused(tmp_path, capsys):
    make_models(tmp_path)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "id_rsa").write_text(SECRET)
    (tmp_path / "base" / "modules.json").write_text(json.dumps([{"idx": 1, "path": "1_Pooling", "type": "x"}]))
    (tmp_path / "base" / "1_Pooling").symlink_to(tmp_path / "private")
    assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "outside the model folder" in one_line_error(capsys)
    (tmp_path / "base" / "modules.json").write_text(json.dumps([{"idx": 1, "path": "../private", "type": "x"}]))
    assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "not a folder inside the model folder" in one_line_error(capsys)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def hf_cache(root: Path, flat, side: dict[str, str]) -> Path:
    """A Hugging Face cache repo: files in blobs/<hash>, snapshots/<rev>/<name> -> ../../blobs/<hash>."""
    repo = root / "hub" / "models--org--tiny-bert"
    staging = root / "staging"
    ckio.save(staging, flat)
    for name, text in side.items():
        (staging / name).write_text(text)
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        file.rename(blob)
        (snap / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    staging.rmdir()
    return snap


def test_hugging_face_cache_layout_with_blob_links_still_merges(tmp_path):
    rng = np.random.default_rng(0)
    base = bert_like(rng)
    experts = experts_of(base, rng, 2)
    snap = hf_cache(tmp_path, base, {"config.json": json.dumps({"model_type": "bert"}), "vocab.txt": "[PAD]\n"})
    for i, e in enumerate(experts):
        ckio.save(tmp_path / f"e{i}", e)
    base_dir = os.path.relpath(snap, tmp_path)
    out = merge_checkpoints(write_config(tmp_path, base_model=base_dir), tmp_path / "out", progress=False)
    want = merge(base, experts, "task_arithmetic", layout="torch")
    got = ckio.load(out)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key], np.float64), np.asarray(want[key], np.float64), rtol=1e-6)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "bert"}
    assert not (out / "config.json").is_symlink() and (out / "vocab.txt").read_text() == "[PAD]\n"
    assert yaml.safe_load((out / CONFIG_NAME).read_text())["base_model"] == base_dir


def test_hugging_face_cache_link_out_of_the_repo_folder_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    snap = hf_cache(tmp_path, bert_like(rng), {"config.json": "{}"})
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "cafe").write_text(SECRET)
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to(Path("..") / ".." / ".." / "models--org--other" / "blobs" / "cafe")
    from swudi_jax.checkpoint.io.side_files import plan_side_files
    outside = r"config.json resolves to .*outside the model folder .*models--org--tiny-bert"
    with pytest.raises(ckio.CheckpointError, match=outside):
        plan_side_files(snap)
    assert confine.model_root(snap) == (tmp_path / "hub" / "models--org--tiny-bert").resolve()


# ----------------------------------------------------------------------------- 2. index escape


def call_with_deadline(fn, seconds: float = 30.0):
    """Run ``fn`` in a thread; fail (instead of hanging) if it blocks, e.g. on opening a FIFO."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), result


def unblock(fifo: Path) -> None:
    """Give a reader blocked on ``fifo`` a writer (and an end of file), should one be blocked."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


@pytest.mark.parametrize("entry", ["relative", "absolute", "dotdot"])
def test_index_entry_outside_the_folder_is_refused_without_opening_it(tmp_path, entry):
    make_models(tmp_path, shard_size=1500, side_files=False)
    fifo = tmp_path / "elsewhere" / "model-00001-of-00002.safetensors"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    name = {"relative": "../elsewhere/model-00001-of-00002.safetensors", "absolute": str(fifo), "dotdot": ".."}[entry]
    index_path = tmp_path / "e1" / safetensors_io.INDEX_NAME
    index = json.loads(index_path.read_text())
    key = min(index["weight_map"])
    index["weight_map"][key] = name
    index_path.write_text(json.dumps(index))
    try:
        hung, result = call_with_deadline(lambda: ckio.open_checkpoint(tmp_path / "e1"))
    finally:
        unblock(fifo)
    assert not hung, "the reader opened the FIFO named by the index"
    message = str(result.get("error"))
    assert isinstance(result.get("error"), ckio.CheckpointError), result
    assert str(index_path) in message and repr(key) in message and repr(name) in message
    assert "not a plain file name inside the model folder" in message


def test_index_entry_naming_a_valid_foreign_shard_is_refused_by_the_command(tmp_path, capsys):
    make_models(tmp_path, shard_size=1500, side_files=False)
    ckio.save(tmp_path / "other", bert_like(np.random.default_rng(9)), shard_size=1500)
    index_path = tmp_path / "e1" / safetensors_io.INDEX_NAME
    index = json.loads(index_path.read_text())
    first = min(index["weight_map"].values())
    index["weight_map"] = {k: (f"../other/{v}" if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert "models[1]" in err and f"'../other/{first}'" in err and "not a plain file name" in err
    assert not (tmp_path / "out").exists()


def test_shard_links_and_special_files_inside_the_folder_are_refused_without_opening(tmp_path):
    make_models(tmp_path, side_files=False)
    (tmp_path / "elsewhere").mkdir()
    ckio.save(tmp_path / "elsewhere" / "model.safetensors", bert_like(np.random.default_rng(9)))
    shard = tmp_path / "e1" / "model.safetensors"
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere" / "model.safetensors")  # a plain name, but a link outward
    with pytest.raises(ckio.CheckpointError, match=r"e1/model.safetensors resolves to .*outside the model folder"):
        ckio.open_checkpoint(tmp_path / "e1")
    shard.unlink()
    os.mkfifo(shard)  # no index: the glob finds a FIFO named *.safetensors
    try:
        hung, result = call_with_deadline(lambda: ckio.open_checkpoint(tmp_path / "e1"))
        hung_npz, result_npz = call_with_deadline(lambda: ckio.open_checkpoint(shard, "npz"))
    finally:
        unblock(shard)
    assert not hung and not hung_npz
    assert "is a FIFO, not a regular file" in str(result.get("error"))
    assert "is a FIFO, not a regular file" in str(result_npz.get("error"))


def test_orbax_checkpoint_with_a_link_outward_is_refused(tmp_path):
    ckio.save(tmp_path / "ck", {"params/w": np.ones((2, 2), np.float32)}, "orbax")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "id_rsa").write_text(SECRET)
    victim = next(p for p in sorted((tmp_path / "ck").rglob("*")) if p.is_file() and "_METADATA" not in p.name)
    victim.unlink()
    victim.symlink_to(tmp_path / "private" / "id_rsa")
    with pytest.raises(ckio.CheckpointError, match="outside the model folder"):
        ckio.open_checkpoint(tmp_path / "ck")


def test_index_whose_weight_map_is_a_list_gets_a_clean_error_naming_it(tmp_path, capsys):
    make_models(tmp_path, shard_size=1500, side_files=False)
    index_path = tmp_path / "e0" / safetensors_io.INDEX_NAME
    index_path.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert f"{index_path}: `weight_map` must be a mapping of tensor name to shard file, got a list" in err


# ----------------------------------------------------------------------------- 3. refused outputs


@pytest.mark.parametrize("out", ["", " ", ".", "./", "..", "CWD", "ROOT", "BASE", "BASE/sub", "CONFIG_PARENT"])
def test_outputs_that_would_replace_the_user_s_files_are_refused_even_with_force(tmp_path, monkeypatch, capsys, out):
    make_models(tmp_path)
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    cfg = write_config(cfg_dir, base_model="../base", models=["../e0", "../e1"])
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {"CWD": str(work), "ROOT": str(tmp_path), "BASE": str(tmp_path / "base"),
           "BASE/sub": str(tmp_path / "base" / "sub"), "CONFIG_PARENT": str(cfg_dir)}.get(out, out)
    before = snapshot(tmp_path)
    assert main([str(cfg), out, "--no-progress", "--force"]) == 1
    err = one_line_error(capsys)
    assert any(s in err for s in ("is empty", "working directory", "not a folder name", "contains (or is) the input",
                                  "lies inside the input")), err
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == [] and leftovers(work) == []


def test_dangling_symlink_output_is_refused_without_force_and_only_the_link_replaced_with_it(tmp_path, capsys):
    make_models(tmp_path)
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "is a dangling symbolic link" in one_line_error(capsys)
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "nowhere").exists()
    assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress", "--force"]) == 0
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "nowhere").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 4. OUT changed mid-run


def interfere_on_second_group(monkeypatch, action):
    real, calls = checkpoint_merge.merge_group, []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_merge, "merge_group", wrapped)
    return calls


@pytest.mark.parametrize("force", [False, True])
def test_output_created_or_changed_mid_run_survives_and_the_result_is_kept_aside(tmp_path, monkeypatch, capsys, force):
    base, experts = make_models(tmp_path)
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "old.txt").write_text("old")
        (out / CONFIG_NAME).write_text("{}")  # an earlier output's

    def someone_writes():
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")

    interfere_on_second_group(monkeypatch, someone_writes)
    args = [str(write_config(tmp_path)), str(out), "--no-progress"] + (["--force"] if force else [])
    assert main(args) == 1
    err = one_line_error(capsys)
    assert f"output {out}" in err and "during the run" in err and "the merged result is kept at" in err
    assert (out / "theirs.txt").read_text() == "theirs"
    assert sorted(p.name for p in out.iterdir()) == ([CONFIG_NAME, "old.txt", "theirs.txt"] if force else ["theirs.txt"])
    kept = Path(err.split("kept at ")[1].split(" (move it")[0])
    assert kept.parent == tmp_path and kept.name.startswith(".out.swudi-merge.") and kept.suffix == ".kept"
    got = ckio.load(kept)
    want = merge(base, experts, "task_arithmetic", layout="torch")
    np.testing.assert_allclose(got["bert.encoder.layer.0.attention.self.query.weight"],
                               want["bert.encoder.layer.0.attention.self.query.weight"], rtol=1e-6)
    assert not (tmp_path / f".out.{output.TAG}.lock").exists()


def test_forced_run_that_fails_mid_merge_leaves_the_old_output_intact(tmp_path, monkeypatch, capsys):
    make_models(tmp_path)
    out = tmp_path / "out"
    assert main([str(write_config(tmp_path)), str(out), "--no-progress"]) == 0
    before = snapshot(out)

    def failure():
        raise RuntimeError("simulated failure in the middle of the merge")

    calls = interfere_on_second_group(monkeypatch, failure)
    assert main([str(write_config(tmp_path, merge_method="average")), str(out), "--no-progress", "--force"]) == 1
    assert "simulated failure" in one_line_error(capsys) and len(calls) == 2
    assert snapshot(out) == before and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 5. concurrent runs


def test_second_run_to_a_locked_output_fails_at_once(tmp_path, capsys):
    make_models(tmp_path)
    with OutputSlot(tmp_path / "out") as slot:
        start = time.monotonic()
        assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 1
        err = one_line_error(capsys)
        assert f"is being written by another swudi-merge run (pid {os.getpid()})" in err
        assert slot.tmp.is_dir() and time.monotonic() - start < 60
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_two_concurrent_runs_exactly_one_succeeds_and_out_is_its_complete_output(tmp_path, capsys):
    make_slow_models(tmp_path, "task_arithmetic", n=12)  # cheap groups: the first run ends soon after
    cfg = tmp_path / "merge.yaml"
    first = subprocess.Popen(run_cli(cfg, tmp_path / "out"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=cli_env())
    try:
        wait_for_temporary(tmp_path, first)
        second = main([str(cfg), str(tmp_path / "out"), "--no-progress"])
        err = one_line_error(capsys)
    finally:
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second == 1 and "another swudi-merge run" in err
    got, base = ckio.load(tmp_path / "out"), ckio.load(tmp_path / "base")
    assert sorted(got) == sorted(base) and (tmp_path / "out" / "README.md").is_file()
    some = [f"model.layers.{i}.mlp.weight" for i in (0, 11)]  # complete: the first and the last group match
    want = merge({k: base[k] for k in some}, [{k: ckio.load(tmp_path / e)[k] for k in some} for e in ("e0", "e1")],
                 "task_arithmetic", layout="torch")
    for key in some:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 6. finite or refused


@pytest.mark.parametrize("method", ["swudi", "ties"])  # today: swudi overflows (refused), ties stays finite
def test_huge_task_vectors_are_refused_or_finite_never_nan_written(tmp_path, capsys, method):
    make_models(tmp_path, size=1e14)
    code = main([str(write_config(tmp_path, merge_method=method)), str(tmp_path / "out"), "--no-progress"])
    if code == 0:
        got = ckio.load(tmp_path / "out")
        assert all(np.isfinite(v).all() for v in got.values() if v.dtype.kind == "f")
    else:
        err = one_line_error(capsys)
        assert "merged tensor 'bert." in err and f"({method})" in err and "non-finite" in err
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_non_finite_merged_tensor_stops_the_run_naming_tensor_and_method(tmp_path, monkeypatch, capsys):
    make_models(tmp_path)
    real = checkpoint_merge.merge_group

    def poisoned(plans, *args, **kwargs):
        merged = real(plans, *args, **kwargs)
        key = "bert.encoder.layer.1.output.dense.weight"
        if key in merged:
            poisoned_value = np.array(merged[key])  # host arrays (merge_group(host_output=True))
            poisoned_value[2, 3] = np.nan
            merged[key] = poisoned_value
        return merged

    monkeypatch.setattr(checkpoint_merge, "merge_group", poisoned)
    assert main([str(write_config(tmp_path, merge_method="ties")), str(tmp_path / "out"), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert "merged tensor 'bert.encoder.layer.1.output.dense.weight' (ties) has 1 non-finite value(s)" in err
    assert "first at index (2, 3)" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_overflow_of_the_output_dtype_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(1)
    base = {"w.weight": (1e5 * rng.normal(size=(4, 4))).astype(np.float32)}  # beyond float16's 65504
    for name, model in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts_of(base, rng, 2)))]:
        ckio.save(tmp_path / name, model)
    cfg = write_config(tmp_path, merge_method="average", out_dtype="float16")
    assert main([str(cfg), str(tmp_path / "out"), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert "merged tensor 'w.weight' (average)" in err and "in float16" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 7. signals, killed runs


@pytest.mark.parametrize("signum, code", [(signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_hangup_and_ctrl_c_clean_up_like_sigterm(tmp_path, signum, code):
    make_slow_models(tmp_path)
    before = snapshot(tmp_path)
    proc = subprocess.Popen(run_cli(tmp_path / "merge.yaml", tmp_path / "out"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    wait_for_temporary(tmp_path, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err  # 128 + the signal number
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "e0", "e1", "merge.yaml"]
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_ctrl_c_at_any_instant_stops_with_130_or_completes_and_never_half_publishes(tmp_path):
    """Through the console script's entry (swudi_jax_cli): SIGINT from the process's first
    milliseconds (Python's start-up, the package's first statements, the imports), during the
    setup and the merge, and SIGINT, SIGINT, SIGTERM 50 ms apart: rc 130 and nothing published
    (or, for a signal after the end, rc 0 and the whole output); never a traceback of the
    program, a crash or a dropped signal. Before the package's first statement only Python runs:
    there the process dies by SIGINT (rc -2: a shell's 130) or Python reports its own start-up
    frames (site's .pth files, runpy), and nothing of the merge has begun."""
    make_slow_models(tmp_path, "task_arithmetic", n=12)
    before = snapshot(tmp_path)
    early = [[t / 1000] for t in (0, 4, 8, 12, 16, 20, 25, 30, 40, 60, 90, 150)]
    for delays in early + [[0.3], [0.8], [1.5], [2.5], [4.0], [1.5, 0.05, 0.05], [3.0, 0.05, 0.05]]:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "swudi_jax_cli", str(tmp_path / "merge.yaml"),
                                 str(tmp_path / "out"), "--no-progress"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=cli_env())
        for delay, signum in zip(delays, (signal.SIGINT, signal.SIGINT, signal.SIGTERM)):
            start += delay
            time.sleep(max(0.0, start - time.monotonic()))
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (130, 0, -signal.SIGINT, 1), (delays, proc.returncode, err)
        assert "Exception ignored" not in err and "race condition" not in err, err
        if proc.returncode in (-signal.SIGINT, 1):  # Python's own start-up, before the package ran
            frames = [line for line in err.splitlines() if line.lstrip().startswith("File ")]
            ours = [f for f in frames if f"{os.sep}swudi_jax{os.sep}" in f or f"{os.sep}swudi_jax_cli{os.sep}" in f]
            assert delays[0] < 0.3 and not ours, (delays, err)
            assert proc.returncode == -signal.SIGINT or "KeyboardInterrupt" in err, err
        else:
            assert "Traceback" not in err, err
        if proc.returncode == 0:
            assert (tmp_path / "out" / "merge_config.yaml").is_file()
            shutil.rmtree(tmp_path / "out")
        else:
            assert proc.returncode != 130 or "interrupted by SIGINT" in err, err
            assert not (tmp_path / "out").exists()
        assert leftovers(tmp_path) == [] and snapshot(tmp_path) == before


def test_a_hangup_the_caller_ignores_stays_ignored(tmp_path):
    make_slow_models(tmp_path, "task_arithmetic", n=12)
    launcher = ("import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                "os.execv(sys.executable, sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", launcher, *run_cli(tmp_path / "merge.yaml", tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    wait_for_temporary(tmp_path, proc)
    proc.send_signal(signal.SIGHUP)  # as nohup: the run goes on
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file() and leftovers(tmp_path) == []


def test_sigkill_then_rerun_removes_only_its_own_stale_temporary_folders(tmp_path):
    make_slow_models(tmp_path, "task_arithmetic")
    proc = subprocess.Popen(run_cli(tmp_path / "merge.yaml", tmp_path / "out"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    wait_for_temporary(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    stale = list(tmp_path.glob(".out.swudi-merge.*.tmp"))
    assert len(stale) == 1
    empty = tmp_path / ".out.swudi-merge.killedearly.tmp"  # killed before it wrote anything: removed too
    empty.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.bin").write_bytes(b"user data")
    keep = [".other.swudi-merge.dead.tmp", ".out.something.tmp", ".out.swudi-merge.abc.kept"]  # not this OUT's temporaries
    for name in keep:
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.bin").write_bytes(b"user data")
    (tmp_path / ".out.swudi-merge.link.tmp").symlink_to(tmp_path / "elsewhere")  # a link: never followed nor removed
    assert main([str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0
    assert not stale[0].exists() and not empty.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "e0", "e1", "merge.yaml", "out", "elsewhere",
                                                                 ".out.swudi-merge.link.tmp", *keep])
    assert all((tmp_path / name / "data.bin").read_bytes() == b"user data" for name in [*keep, "elsewhere"])


# ----------------------------------------------------------------------------- 8. errors that name the file


def test_disk_full_names_the_file_being_written(tmp_path, monkeypatch, capsys):
    make_models(tmp_path)

    class FullDisk:
        def __init__(self, f):
            self._f, self.name = f, f.name

        def write(self, data):
            if self._f.tell() > 0:  # the header fits, the first tensor does not
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(safetensors_io, "open", lambda path, mode: FullDisk(open(path, mode)), raising=False)
    assert main([str(write_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert f"[Errno {errno.ENOSPC}] No space left on device while writing" in err and "model.safetensors" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_file_size_limit_names_the_file_being_written(tmp_path):
    rng = np.random.default_rng(5)
    base = {"w.weight": rng.normal(size=(64, 64)).astype(np.float32)}  # 16 KiB of weights
    for name, model in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts_of(base, rng, 2)))]:
        ckio.save(tmp_path / name, model)
    cfg = write_config(tmp_path, merge_method="average")
    limit = 8192
    # set the limit and ignore SIGXFSZ (EFBIG instead of a kill) in a small launcher that then
    # execs the command: no fork-time hook in this (multithreaded, JAX) process
    launcher = ("import os, resource, signal, sys; "
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); os.execv(sys.executable, sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", launcher, *run_cli(cfg, tmp_path / "out")], check=False,
                          capture_output=True, text=True, timeout=300, env=cli_env())
    assert done.returncode == 1, done.stderr
    assert f"[Errno {errno.EFBIG}] File too large while writing" in done.stderr and "model.safetensors" in done.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 9. determinism


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_methods_with_randomness_give_identical_bytes_across_processes(tmp_path, method):
    assert "dare" in RANDOM_METHODS
    make_models(tmp_path)
    cfg = write_config(tmp_path, merge_method=method, parameters={"seed": 7})
    runs = {seed: subprocess.Popen(run_cli(cfg, tmp_path / f"out{seed}"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=cli_env(PYTHONHASHSEED=seed))
            for seed in ("1", "4242")}
    outputs = []
    for seed, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        out = tmp_path / f"out{seed}"
        outputs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1] and "model.safetensors" in outputs[0]
    merged = ckio.load(tmp_path / "out1")
    base = ckio.load(tmp_path / "base")
    assert not np.array_equal(merged["bert.encoder.layer.0.attention.self.query.weight"],
                              base["bert.encoder.layer.0.attention.self.query.weight"])
