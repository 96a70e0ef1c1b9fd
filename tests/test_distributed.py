"""swudi-merge as 2 and 4 local CPU processes on JAX's distributed runtime (coordinator on localhost,
gloo collectives) writes, byte for byte, what one process writes; failures stop every process.

Each process of a run is ``tests/distributed_checks.py``: it joins the runtime and runs every merge of
the run in turn with ``merge_checkpoints(..., distributed=True)``, so one start of P processes covers
SWUDI, SWUDI-A, SWUDI with time alignment (a whole-model pass), TIES with its whole-model trim, mergekit's
dare_ties, the layers merged on the global mesh, a refused mismatch and a failure on one process.
The kill test runs the console script, as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mergekit_checkpoints import family

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.pipeline import merge_checkpoints

HERE = Path(__file__).resolve().parent
MAX_GROUP = 3000
"""Bytes per group (5 copies of 8×8 float32 layers): one or two layers a group, so every process gets some."""
EXACT = {"swudi": ("swudi", {}), "swudi_a": ("swudi_a", {}), "swudi_alignment": ("swudi", {"alignment": 0.5}),
         "ties_paper": ("ties_paper", {"density": 0.4}), "dare_ties": ("dare_ties", {"density": 0.5, "weight": 0.7})}
"""Merges whose distributed output must equal the single-process one byte for byte."""
SHARED = ("global", "flax_global")
"""Merges of linear layers on the global mesh (rows over every process's devices): equal to float rounding."""
BAD_TENSOR = "model.layers.2.mlp.down_proj.weight"
RUNS = (*EXACT, *SHARED, "mismatch", "nan")


def _config(root: Path, name: str, method: str, parameters: dict, models=("e0", "e1", "e2"), base="base", **extra):
    content = {"base_model": base, "models": list(models), "merge_method": method, "parameters": parameters, **extra}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(content, sort_keys=False))


def _flax_models(root: Path) -> None:
    """(in, out) kernels whose output rows (6, 10) no 4 devices divide: the gathered, padded path."""
    rng = np.random.default_rng(3)
    base = {"params/Dense_0/kernel": rng.normal(size=(8, 6)), "params/Dense_0/bias": rng.normal(size=(6,)),
            "params/Dense_1/kernel": rng.normal(size=(6, 10)), "params/Dense_1/bias": rng.normal(size=(10,))}
    for name, step in (("fbase", 0.0), ("f0", 0.1), ("f1", 0.1)):
        ckio.save(root / name, {k: (v + step * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The checkpoints, the configs of every run and the single-process outputs to compare with."""
    root = tmp_path_factory.mktemp("distributed")
    flats = family(root, 3)
    _flax_models(root)
    bad = dict(flats["e1"])
    bad[BAD_TENSOR] = bad[BAD_TENSOR].copy()
    bad[BAD_TENSOR][1, 2] = np.nan
    ckio.save(root / "e_nan", bad)
    for name, (method, parameters) in EXACT.items():
        _config(root, name, method, parameters)
    _config(root, "global", "swudi", {}, multi_device=True)
    _config(root, "flax_global", "swudi", {}, models=("f0", "f1"), base="fbase", multi_device=True)
    _config(root, "nan", "swudi", {}, models=("e0", "e_nan"))
    for i in range(4):
        _config(root, f"mismatch_{i}", "swudi", {"time": 300.0 if i == 1 else 1300.0})
    (root / "runs.txt").write_text("\n".join(RUNS))
    for name in (*EXACT, *SHARED):
        merge_checkpoints(root / f"{name}.yaml", root / "single" / name, progress=False, max_group_bytes=MAX_GROUP)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": str(HERE.parent) + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Every process's (exit status, stdout, stderr); all are killed, and the test fails, past ``timeout``."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((proc.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"a process was still running after {timeout} s (a hang)")
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("count, devices", [(2, 2), (4, 1)])
def test_distributed_merges_equal_the_single_process_merge(models, tmp_path, count, devices):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_checks.py"), str(models), str(tmp_path),
                               str(port), str(count), str(i), str(MAX_GROUP)], env=_env(devices),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
    done = _wait_all(procs, 600)
    assert all(rc == 0 for rc, _, _ in done), [err[-2000:] for _, _, err in done]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in done]
    assert [r["process"] for r in reports] == list(range(count))
    assert all(r["devices"] == count * devices for r in reports)
    for name in (*EXACT, *SHARED):
        runs = [r["runs"][name] for r in reports]
        assert all(run["ok"] for run in runs), runs
        shares = [run["share"] for run in runs]
        # every group merged once: by one process, or by all together
        assert sum(s["groups"] for s in shares) + shares[0]["shared_groups"] == shares[0]["of_groups"]
    for name in EXACT:
        shares = [r["runs"][name]["share"] for r in reports]
        assert all(s["groups"] > 0 for s in shares), (name, shares)  # each process did its part
        assert _tree(tmp_path / name) == _tree(models / "single" / name), name
    for name in SHARED:
        assert reports[0]["runs"][name]["share"]["shared_groups"] > 0
        got, want = ckio.load(tmp_path / name), ckio.load(models / "single" / name)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-6, err_msg=f"{name}: {key}")
    # a process with another config: every process refuses before anything is written
    mismatch = [r["runs"]["mismatch"] for r in reports]
    assert not any(run["ok"] for run in mismatch)
    assert all("process(es) [1]" in run["error"] and "config" in run["error"] for run in mismatch), mismatch
    # NaN in one process's group: that process names the file and tensor, the others name that process
    nan = [r["runs"]["nan"] for r in reports]
    assert not any(run["ok"] for run in nan)
    owner = [i for i, run in enumerate(nan) if "DistributedError" not in run["error"]]
    assert len(owner) == 1 and BAD_TENSOR in nan[owner[0]]["error"] and "e_nan" in nan[owner[0]]["error"]
    assert all(f"process {owner[0]} of {count} failed" in run["error"] and BAD_TENSOR in run["error"]
               for i, run in enumerate(nan) if i != owner[0])
    assert not (tmp_path / "mismatch").exists() and not (tmp_path / "nan").exists()
    assert not [p.name for p in tmp_path.iterdir() if "swudi-merge" in p.name]  # no temporary folder, no lock


def _slow_models(root: Path, n: int = 16) -> None:
    """n linear layers of distinct shapes: n compiled groups, so the merge runs for a while."""
    rng = np.random.default_rng(5)
    base = {f"model.layers.{i}.mlp.weight": rng.normal(size=(8 + i, 12)).astype(np.float32) for i in range(n)}
    for name in ("base", "e0", "e1"):
        ckio.save(root / name, {k: (v + (0.0 if name == "base" else 0.05) * rng.normal(size=v.shape)).astype(np.float32)
                                for k, v in base.items()})
    _config(root, "slow", "swudi", {}, models=("e0", "e1"))


@pytest.mark.slow
def test_a_killed_process_stops_every_process_and_publishes_nothing(tmp_path):
    _slow_models(tmp_path)
    port, out = _free_port(), tmp_path / "out"
    command = [sys.executable, "-m", "swudi_jax_cli", str(tmp_path / "slow.yaml"), str(out), "--no-progress",
               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--heartbeat-timeout", "5"]
    procs = [subprocess.Popen([*command, "--process-id", str(i)], env=_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.swudi-merge.*.tmp/model.safetensors")) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before the merge started"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # mid-merge: the shards are laid out, the groups being merged
    (rc0, _, err0), (rc1, _, _) = _wait_all(procs, 120)
    assert rc1 == -signal.SIGKILL and rc0 != 0, err0[-2000:]
    assert not out.exists()
    # as after a killed single-process run, the next run to OUT clears what was left and succeeds
    merge_checkpoints(tmp_path / "slow.yaml", out, progress=False)
    assert (out / "model.safetensors").is_file()
    assert not [p.name for p in tmp_path.iterdir() if "swudi-merge" in p.name]


def test_the_split_gives_every_group_once_and_evens_the_estimated_cost(models):
    from swudi_jax.checkpoint.pipeline import plan_checkpoints
    from swudi_jax.checkpoint.work_split import GLOBAL, balance, split_work

    plan = plan_checkpoints(models / "swudi.yaml", max_group_bytes=MAX_GROUP)
    for count in (2, 3, 4):
        shares = [split_work(plan, plan.config.method, "auto", i, count) for i in range(count)]
        assert all(s.owners == shares[0].owners for s in shares)  # every process decides the same
        assert sorted(g for s in shares for g in s.local) == list(range(len(plan.groups)))
        loads = [shares[0].load(p) for p in range(count)]
        assert max(loads) - min(loads) <= max(shares[0].costs)  # longest-first: within one group's cost
        for leaves in ("merged", "linear_maths"):  # a whole-model pass reads each chunk on one process
            positions = sorted(k for s in shares for k in s.positions(plan, leaves))
            assert positions == list(range(len(positions))) and positions
    forced = split_work(plan_checkpoints(models / "global.yaml", max_group_bytes=MAX_GROUP),
                        plan.config.method, True, 0, 2)
    assert forced.global_groups and all(forced.owners[g] == GLOBAL for g in forced.global_groups)
    assert balance([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1, 1, 1]


def test_a_single_process_team_changes_nothing(models, tmp_path):
    timings: dict = {}
    merge_checkpoints(models / "swudi.yaml", tmp_path / "out", progress=False, max_group_bytes=MAX_GROUP,
                      timings=timings)
    assert _tree(tmp_path / "out") == _tree(models / "single" / "swudi")
    assert timings["share"]["processes"] == 1 and timings["share"]["groups"] == timings["share"]["of_groups"]
