"""What a mergekit user meets first (issue 21, items 2, 5, 6, 7): the keys mergekit accepts and
ignores, mergekit-yaml's flags, relative paths and shard sizes as mergekit reads them, and the
messages and files of a run (one-line warnings, mergekit_config.yml, the card's tags)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import yaml
from mergekit_checkpoints import family, write

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.cli import NO_EFFECT, main
from swudi_jax.checkpoint.config import ConfigError, load_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_surface")
    return root, family(root, n_experts=2, seed=7)


def cli(capsys, *argv) -> tuple[int, list[str]]:
    """The command's exit status and its stderr lines."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.splitlines()


TIES = {"models": [{"model": "base"}, {"model": "e0", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "e1", "parameters": {"weight": 0.4, "density": 0.7}}],
        "merge_method": "ties", "base_model": "base",
        "parameters": {"normalize": True, "int8_mask": True, "lambda": 1.0}, "dtype": "float32"}


# ----------------------------------------------------------------------------- 2. keys mergekit ignores


def test_a_ties_config_runs_with_swudi_unchanged_and_one_warning_names_what_has_no_effect(models, capsys):
    root, _ = models
    swapped = write(root, "swapped", {**TIES, "merge_method": "swudi", "name": "my-merge"})
    plain = write(root, "plain", {"models": [{"model": "e0", "parameters": {"weight": 0.6}},
                                             {"model": "e1", "parameters": {"weight": 0.4}}],
                                  "merge_method": "swudi", "base_model": "base", "dtype": "float32"})
    code, err = cli(capsys, swapped, root / "swapped_out", "--no-progress")
    assert code == 0, err
    assert err == [
        f"swudi-merge: warning: config {swapped}: top-level key(s) 'name' have no effect (not config settings; "
        "ignored, as mergekit ignores them)",
        f"swudi-merge: warning: config {swapped}: `parameters` ['normalize', 'int8_mask', 'lambda'] have no effect "
        "with merge_method 'swudi' (mergekit parameters this method does not use; ignored, as mergekit ignores them)",
        f"swudi-merge: warning: config {swapped}: `models[1].parameters` ['density']; `models[2].parameters` "
        "['density']: not per-model options of 'swudi' (those are ['weight']); no effect, as in mergekit",
    ]
    assert main([str(plain), str(root / "plain_out"), "--no-progress"]) == 0
    got, want = ckio.load(root / "swapped_out"), ckio.load(root / "plain_out")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_options_the_method_has_are_used_and_only_the_others_are_warned_about(models, recwarn):
    root, _ = models
    config = load_config(write(root, "ties", TIES))  # normalize, int8_mask and lambda are ties options
    assert (config.parameters["normalize"], config.parameters["int8_mask"], config.parameters["lam"]) == (True, True, 1.0)
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"`parameters` \['rescale', 'int8_mask'\] have no effect with merge_method "
                                         r"'task_arithmetic'"):
        config = load_config(write(root, "ta", {**TIES, "merge_method": "task_arithmetic",
                                                 "parameters": {"rescale": True, "int8_mask": True, "lambda": 0.5}}))
    assert config.parameters["lam"] == 0.5 and "rescale" not in config.parameters
    with pytest.warns(UserWarning, match=r"`parameters` \['lambda', 'density'\] have no effect with merge_method 'slerp'"):
        load_config(write(root, "slerp_extra", {"models": ["base", "e0"], "base_model": "base", "merge_method": "slerp",
                                                "parameters": {"t": 0.3, "lambda": 1.0, "density": 0.5}}))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['tme'\] for merge method 'swudi'"):
        load_config(write(root, "typo", {**TIES, "merge_method": "swudi", "parameters": {"tme": 3.0}}))  # no one's name


def test_a_slerp_listing_its_base_merges_without_any_warning(models, capsys):
    root, _ = models
    sliced = write(root, "slerp", {"slices": [{"sources": [{"model": "base", "layer_range": [0, 3]},
                                                           {"model": "e0", "layer_range": [0, 3]}]}],
                                   "merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5}})
    listed = write(root, "slerp_models", {"models": ["base", "e0"], "merge_method": "slerp", "base_model": "base",
                                          "parameters": {"t": 0.5}})
    for config, out in ((sliced, "slerp_out"), (listed, "slerp_models_out")):
        code, err = cli(capsys, config, root / out, "--no-progress")
        assert (code, err) == (0, []), config
    assert "models[0] is the base model: it is the base, not an expert, as in mergekit" in \
        (root / "slerp_models_out" / "README.md").read_text()
    got, want = ckio.load(root / "slerp_out"), ckio.load(root / "slerp_models_out")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ----------------------------------------------------------------------------- 5. mergekit-yaml's flags


def test_every_mergekit_flag_is_accepted_and_those_without_effect_are_named_in_one_line(models, capsys):
    root, _ = models
    config = write(root, "flags", {**TIES, "models": TIES["models"][1:]})
    no_effect = ["--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--multi-gpu", "--clone-tensors",
                 "--async-write", "--no-safe-serialization", "--device", "cpu", "--write-threads", "2",
                 "--lora-merge-cache", "/tmp/x", "--lora-merge-dtype", "float32", "--transformers-cache", "/tmp/y",
                 "-v", "-v"]
    defaults = ["--no-lazy-unpickle", "--no-low-cpu-memory", "--safe-serialization", "--write-model-card",
                "--copy-tokenizer", "--no-trust-remote-code", "--no-cuda", "--quiet", "--allow-crimes"]
    code, err = cli(capsys, config, root / "flags_out", "--dry-run", *defaults, *no_effect, "--trust-remote-code")
    assert code == 0, err
    assert err == ["swudi-merge: note: --lazy-unpickle, --low-cpu-memory, --read-to-gpu, --multi-gpu, --clone-tensors, "
                   "--async-write, --no-safe-serialization, --device, --write-threads, --lora-merge-cache, "
                   "--lora-merge-dtype, --transformers-cache, -v: no effect here (mergekit's memory, device, writer and "
                   "cache settings); --trust-remote-code: no code from a model folder is ever run here (nothing to "
                   "trust); --allow-crimes: lifts no check (models must have the same tensor names and shapes)"]
    assert {spelled for _, spelled in NO_EFFECT.values()} <= set(no_effect)
    code, err = cli(capsys, config, root / "flags_out", "--dry-run", *defaults[:-1])
    assert (code, err) == (0, [])  # mergekit's defaults spelled out: nothing to say
    if jax.default_backend() == "cpu":  # --gpu-rich is --cuda and more, as in mergekit
        code, err = cli(capsys, config, root / "flags_out", "--gpu-rich")
        assert code == 1 and err == ["swudi-merge: error: --gpu-rich (implies --cuda, as in mergekit): JAX sees no "
                                     "accelerator (its backend is cpu); install jax with CUDA support (pip install "
                                     "'jax[cuda12]') or leave it out to merge on the CPU"]
    assert not (root / "flags_out").exists()


def test_no_write_model_card_and_quiet(models, capsys):
    root, _ = models
    config = write(root, "card", {**TIES, "models": TIES["models"][1:]})
    code, err = cli(capsys, config, root / "no_card", "--no-write-model-card", "--quiet")
    assert (code, err) == (0, [])  # --quiet: no progress bar on stderr
    names = sorted(p.name for p in (root / "no_card").iterdir())
    assert "README.md" not in names and "mergekit_config.yml" not in names and "merge_config.yaml" in names
    assert main([str(config), str(root / "card_out"), "--no-progress"]) == 0
    assert (root / "card_out" / "mergekit_config.yml").read_text() == config.read_text()  # mergekit's file and name
    front = yaml.safe_load((root / "card_out" / "README.md").read_text().split("---\n")[1])
    assert front["tags"][:2] == ["mergekit", "merge"]


def test_random_seed_seeds_the_methods_that_draw(models, capsys):
    root, _ = models
    dare = {"models": [{"model": "e0", "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": "e1", "parameters": {"weight": 1.0, "density": 0.5}}],
            "merge_method": "dare_ties", "base_model": "base"}
    assert main([str(write(root, "dare", dare)), str(root / "seed7"), "--random-seed", "7", "--no-progress"]) == 0
    seeded = write(root, "dare7", {**dare, "parameters": {"seed": 7}})
    assert main([str(seeded), str(root / "param7"), "--no-progress"]) == 0
    assert main([str(write(root, "dare", dare)), str(root / "seed0"), "--no-progress"]) == 0
    a, b, c = (ckio.load(root / n) for n in ("seed7", "param7", "seed0"))
    name = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])
    code, err = cli(capsys, seeded, root / "both", "--random-seed", "8")
    assert code == 1 and "`parameters.seed` is 7 and --random-seed is 8" in err[0]
    code, err = cli(capsys, write(root, "ta_seed", {**dare, "merge_method": "task_arithmetic", "models": ["e0", "e1"]}),
                    root / "ta_seed_out",
                    "--random-seed", "8", "--dry-run")
    assert code == 0 and err == ["swudi-merge: warning: --random-seed has no effect: merge_method 'task_arithmetic' "
                                 "draws nothing at random"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_num_threads_limits_the_cores_and_gives_them_back(models, capsys, monkeypatch):
    root, _ = models
    before = os.sched_getaffinity(0)
    calls = []
    real = os.sched_setaffinity
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: (calls.append(set(cores)), real(pid, cores)))
    config = write(root, "threads", {**TIES, "models": TIES["models"][1:]})
    code, err = cli(capsys, config, root / "threads_out", "-j", "1", "--dry-run")
    assert (code, err) == (0, [])
    assert calls[0] == {min(before)} and os.sched_getaffinity(0) == before
    code, err = cli(capsys, config, root / "threads_out", "--num-threads", "0", "--dry-run")
    assert code == 1 and "--num-threads must be at least 1" in err[0]


# ----------------------------------------------------------------------------- 6. paths from the working directory


def test_a_config_in_a_subfolder_runs_from_the_repository_root_as_with_mergekit_yaml(models, capsys, monkeypatch):
    root, _ = models
    (root / "configs").mkdir(exist_ok=True)
    config = write(root / "configs", "x", {**TIES, "models": TIES["models"][1:]})  # `base`, `e0`: in root, not configs/
    monkeypatch.chdir(root)
    code, err = cli(capsys, "configs/x.yaml", "from_root", "--no-progress", "--out-shard-size", "2K")
    assert (code, err) == (0, []) and config.is_file()
    assert len(list((root / "from_root").glob("*.safetensors"))) > 1  # "2K": 2000 bytes per shard, as mergekit
