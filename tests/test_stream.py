"""The overlapped read → merge → write pipeline: bit-identical to the sequential one, at most two
items held per side, and a failure in any stage stops the others and leaves no output."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import yaml

import swudi_jax.checkpoint.pipeline as pipeline
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.cli import main
from swudi_jax.checkpoint.stream import run_overlapped, run_sequential


def test_overlapped_executor_keeps_order_and_holds_at_most_two_items_per_side():
    alive_in, alive_out, peak, lock, written = set(), set(), {"in": 0, "out": 0}, threading.Lock(), []

    def read(i):
        with lock:
            alive_in.add(i)
            peak["in"] = max(peak["in"], len(alive_in))
        time.sleep(0.002)
        return i

    def compute(i, data):
        time.sleep(0.001)
        with lock:
            alive_in.discard(i)
            alive_out.add(i)
            peak["out"] = max(peak["out"], len(alive_out))
        return data * 10

    def write(i, result):
        time.sleep(0.003)
        written.append(result)
        with lock:
            alive_out.discard(i)

    times = run_overlapped(range(20), read, compute, write)
    assert written == [10 * i for i in range(20)]
    assert peak == {"in": 2, "out": 2}
    assert times.items == 20 and times.wall_s > 0 and min(times.read_s, times.compute_s, times.write_s) > 0
    assert run_sequential(range(20), read, compute, write).items == 20


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_a_failing_stage_stops_the_others_and_raises_in_the_caller(stage):
    calls = {"read": [], "compute": [], "write": []}

    def step(name, i):
        calls[name].append(i)
        if name == stage and i == 3:
            raise RuntimeError(f"{name} failed at {i}")

    def read(i):
        step("read", i)
        return i

    def compute(i, data):
        step("compute", i)
        return data

    def write(i, result):
        step("write", i)

    with pytest.raises(RuntimeError, match=f"{stage} failed at 3"):
        run_overlapped(range(50), read, compute, write)
    assert max(calls["read"]) <= 6 and max(calls["write"], default=-1) <= 3  # nothing ran far past the failure
    assert not [t for t in threading.enumerate() if t.name in ("swudi-prefetch", "swudi-write-behind")]


@pytest.fixture
def on_disk(tmp_path):
    rng = np.random.default_rng(0)
    base = {}
    for i in range(3):
        base[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.normal(size=(8, 8))
        base[f"model.layers.{i}.mlp.up_proj.weight"] = rng.normal(size=(12, 8))
        base[f"model.layers.{i}.mlp.up_proj.bias"] = rng.normal(size=(12,))
        base[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(8,))
    base = {k: v.astype(np.float32) for k, v in base.items()}
    ckio.save(tmp_path / "base", base, shard_size=1000)
    for i in range(3):
        ckio.save(tmp_path / f"e{i}", {k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32)
                                       for k, v in base.items()}, shard_size=1000)
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump({"base_model": "base", "models": ["e0", "e1", "e2"], "merge_method": "swudi"}))
    return tmp_path, config


def weight_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))} | \
        {p.name: p.read_bytes() for p in sorted(folder.glob("*.index.json"))}


def test_overlapped_merge_is_bit_identical_to_the_sequential_merge(on_disk):
    root, config = on_disk
    timings = {}
    pipeline.merge_checkpoints(config, root / "seq", progress=False, max_group_bytes=2000, overlap=False)
    pipeline.merge_checkpoints(config, root / "ovl", progress=False, max_group_bytes=2000, timings=timings)
    seq, ovl = weight_bytes(root / "seq"), weight_bytes(root / "ovl")
    assert sorted(seq) == sorted(ovl) and len(seq) >= 1
    for name in seq:
        assert seq[name] == ovl[name], name
    assert timings["overlapped"] and timings["items"] >= 6 and timings["wall_s"] > 0


@pytest.mark.parametrize("stage", ["read", "write"])
def test_a_failed_read_or_write_mid_merge_leaves_no_output(on_disk, monkeypatch, capsys, stage):
    root, config = on_disk
    calls = []
    if stage == "read":
        real = pipeline._read_group

        def failing(reader, keys):
            calls.append(1)
            if len(calls) == 9:  # the third group's base read
                raise OSError("disk went away")
            return real(reader, keys)

        monkeypatch.setattr(pipeline, "_read_group", failing)
    else:
        real_open = pipeline.ckio.open_writer

        def open_writer(*args, **kwargs):
            writer = real_open(*args, **kwargs)
            real_write = writer.write

            def write(key, array):
                calls.append(1)
                if len(calls) == 4:
                    raise OSError("no space left on device")
                real_write(key, array)

            writer.write = write
            return writer

        monkeypatch.setattr(pipeline.ckio, "open_writer", open_writer)
    assert main([str(config), str(root / "out"), "--no-progress", "--max-group-size", "2000"]) == 1
    err = capsys.readouterr().err
    assert ("disk went away" if stage == "read" else "no space left") in err
    assert sorted(p.name for p in root.iterdir()) == ["base", "e0", "e1", "e2", "m.yaml"]
