"""Checkpoint readers/writers: exact round trips, lazy reads, sharding, bad files, atomic writes."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.io import safetensors_io
from swudi_jax.checkpoint.io.atomic import atomic_directory


def sample_flat(seed: int = 0, sep: str = "/") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"params{sep}dense{sep}kernel": rng.normal(size=(6, 5)).astype(np.float32),
        f"params{sep}dense{sep}bias": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
        f"params{sep}norm{sep}scale": rng.normal(size=(5,)).astype(np.float16),
        f"params{sep}emb": rng.normal(size=(3, 4)).astype(np.float64),
        f"params{sep}step": np.array(7, dtype=np.int32),
        f"params{sep}mask": np.array([True, False, True]),
    }


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.dtype == y.dtype, key
        assert x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


@pytest.mark.parametrize("target, fmt, detected", [
    ("model.safetensors", "auto", "safetensors"), ("sharded_dir", "auto", "safetensors"),
    ("ckpt", "orbax", "orbax"), ("model.msgpack", "auto", "msgpack"), ("model.npz", "auto", "npz"),
])
def test_every_format_round_trips_exactly(tmp_path, target, fmt, detected):
    flat = sample_flat()
    path = ckio.save(tmp_path / target, flat, fmt, shard_size=100)
    assert ckio.detect_format(path) == detected
    with ckio.open_checkpoint(path) as reader:
        for key, value in flat.items():
            assert reader.shape_dtype(key) == (value.shape, value.dtype)
        assert_identical(reader.read_many(reader.keys()), flat)


def test_safetensors_directory_is_sharded_with_a_valid_index(tmp_path):
    flat = {f"model.layers.{i}.mlp.weight": np.full((16, 8), i, np.float32) for i in range(5)}
    ckio.save(tmp_path / "out", flat, shard_size=2 * 16 * 8 * 4)
    index = json.loads((tmp_path / "out" / safetensors_io.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 5 * 16 * 8 * 4
    from safetensors.numpy import load_file  # the reference reader agrees with ours
    merged = {}
    for shard in shards:
        merged.update(load_file(str(tmp_path / "out" / shard)))
    assert_identical(merged, flat)


def test_safetensors_reader_reads_only_the_requested_tensors(tmp_path):
    flat = sample_flat(sep=".")
    ckio.save(tmp_path / "m", flat, shard_size=64)
    with ckio.open_checkpoint(tmp_path / "m") as reader:
        got = reader.read_many(["params.emb", "params.dense.bias"])
    assert sorted(got) == ["params.dense.bias", "params.emb"]
    assert got["params.dense.bias"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["params.emb"], flat["params.emb"])


def test_orbax_reader_restores_a_subset_lazily(tmp_path):
    flat = sample_flat()
    ckio.save(tmp_path / "ck", flat, "orbax")
    with ckio.open_checkpoint(tmp_path / "ck") as reader:
        got = reader.read_many(["params/dense/kernel"])
    assert list(got) == ["params/dense/kernel"] and isinstance(got["params/dense/kernel"], np.ndarray)
    np.testing.assert_array_equal(got["params/dense/kernel"], flat["params/dense/kernel"])


def test_orbax_typed_keys_are_found_and_saved_as_keys_again(tmp_path):
    import jax
    import orbax.checkpoint as ocp

    keys = {"one": jax.random.key(1), "batch": jax.random.split(jax.random.key(2), 3),
            "rbg": jax.random.key(3, impl="rbg")}
    tree = {**keys, "plain": np.arange(6, dtype=np.uint32).reshape(3, 2), "w": np.ones((2, 2), np.float32)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((tmp_path / "ck").absolute(), tree)
    with ckio.open_checkpoint(tmp_path / "ck") as reader:
        impls = reader.key_impls()
        data = reader.read_many(list(tree))
    assert set(impls) == set(keys)  # the plain uint32 (3, 2) array is no key
    writer = ckio.open_writer(tmp_path / "out", "orbax", {}, key_impls=impls)
    for name, array in data.items():
        writer.write(name, array)
    writer.close()
    with ocp.StandardCheckpointer() as checkpointer:
        back = checkpointer.restore((tmp_path / "out").absolute())
    for name, key in keys.items():
        assert jax.random.key_impl(back[name]) == jax.random.key_impl(key), name
        np.testing.assert_array_equal(jax.random.key_data(back[name]), jax.random.key_data(key))
    np.testing.assert_array_equal(back["plain"], tree["plain"])
    bad = ckio.open_writer(tmp_path / "bad", "orbax", {}, key_impls=impls)
    with pytest.raises(ckio.CheckpointError, match="'one' was a PRNG key in the base"):
        bad.write("one", np.zeros(4, np.uint32))  # threefry key data has 2 words


def test_truncated_safetensors_file_is_reported_with_its_name(tmp_path):
    path = ckio.save(tmp_path / "model.safetensors", sample_flat())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ckio.CheckpointError, match="model.safetensors.*truncated"):
        ckio.open_checkpoint(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ckio.CheckpointError, match="model.safetensors"):
        ckio.open_checkpoint(path)


def test_index_listing_a_missing_shard_is_reported(tmp_path):
    flat = {f"w{i}": np.ones((8, 8), np.float32) for i in range(3)}
    ckio.save(tmp_path / "m", flat, shard_size=300)
    (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ckio.CheckpointError, match="do not exist.*00002"):
        ckio.open_checkpoint(tmp_path / "m")


def test_damaged_orbax_checkpoint_is_reported(tmp_path):
    ckio.save(tmp_path / "ck", sample_flat(), "orbax")
    for root, _, files in os.walk(tmp_path / "ck"):
        for name in files:  # truncate every data file, keep the metadata
            full = os.path.join(root, name)
            if "/d/" in full:
                with open(full, "r+b") as f:
                    f.truncate(3)
    with pytest.raises(ckio.CheckpointError, match="ck.*orbax"):
        ckio.load(tmp_path / "ck")


def test_truncated_npz_and_msgpack_are_reported(tmp_path):
    for name in ("m.npz", "m.msgpack"):
        path = ckio.save(tmp_path / name, sample_flat())
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        with pytest.raises(ckio.CheckpointError, match=name):
            ckio.load(path)


def test_unknown_paths_and_formats_are_reported(tmp_path):
    with pytest.raises(ckio.CheckpointError, match="no such file"):
        ckio.open_checkpoint(tmp_path / "absent")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ckio.CheckpointError, match="cannot tell the checkpoint format"):
        ckio.open_checkpoint(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="format must be one of"):
        ckio.open_checkpoint(tmp_path / "weights.bin", format="pickle")


def test_save_refuses_an_existing_output_unless_forced(tmp_path):
    first, second = sample_flat(0), sample_flat(1)
    ckio.save(tmp_path / "m", first)
    with pytest.raises(ValueError, match="not empty.*force"):
        ckio.save(tmp_path / "m", second)
    assert_identical(ckio.load(tmp_path / "m"), first)
    ckio.save(tmp_path / "m", second, force=True)
    assert_identical(ckio.load(tmp_path / "m"), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(self, key, array):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", boom)
    for target in ("m", "m.safetensors"):
        with pytest.raises(RuntimeError, match="disk full"):
            ckio.save(tmp_path / target, sample_flat())
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_keeps_the_old_output_when_the_new_one_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_npz_without_dtype_record_keeps_plain_numpy_dtypes(tmp_path):
    flat = {"a": np.arange(4, dtype=np.uint16), "b/c": np.ones((2, 2), np.float32)}
    np.savez(tmp_path / "plain.npz", **flat)
    assert_identical(ckio.load(tmp_path / "plain.npz"), flat)


def test_saved_directory_gets_the_default_mode_not_mkdtemp_s(tmp_path):
    mask = os.umask(0o022)
    try:
        ckio.save(tmp_path / "m", sample_flat())
    finally:
        os.umask(mask)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_index_escaping_the_folder_or_not_a_mapping_is_refused(tmp_path):
    flat = {f"w{i}": np.ones((8, 8), np.float32) for i in range(3)}
    ckio.save(tmp_path / "m", flat, shard_size=300)
    index = tmp_path / "m" / safetensors_io.INDEX_NAME
    content = json.loads(index.read_text())
    for bad in ("../x.safetensors", "/etc/passwd", "sub/model.safetensors", ""):
        index.write_text(json.dumps({**content, "weight_map": {**content["weight_map"], "w1": bad}}))
        with pytest.raises(ckio.CheckpointError, match=r"entry 'w1' names .* not a plain file name"):
            ckio.open_checkpoint(tmp_path / "m")
    index.write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(ckio.CheckpointError, match=r"index.json: `weight_map` must be a mapping .* got a list"):
        ckio.open_checkpoint(tmp_path / "m")
