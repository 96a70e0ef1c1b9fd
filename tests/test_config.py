"""The YAML merge config: defaults, resolution of paths and options, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint.config import ConfigError, load_config, parse_config, parse_size


@pytest.fixture
def models(tmp_path):
    for name in ("base", "e1", "e2"):
        ckio.save(tmp_path / f"{name}.safetensors", {"w": np.ones((2, 2), np.float32)})
    return tmp_path


def write_config(directory, **content):
    path = directory / "merge.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def minimal(**extra):
    return {"base_model": "base.safetensors", "models": ["e1.safetensors", {"model": "e2.safetensors"}],
            "merge_method": "swudi", **extra}


def test_minimal_config_gets_resolved_paths_and_method_defaults(models):
    config = load_config(write_config(models, **minimal()))
    assert config.base_model == (models / "base.safetensors").resolve()
    assert config.models == ((models / "e1.safetensors").resolve(), (models / "e2.safetensors").resolve())
    from swudi_jax.methods import registry
    assert dict(config.parameters) == registry.resolve_options("swudi", {})
    assert (config.layout, config.dtype, config.out_dtype, config.format) == ("auto", "float32", None, "auto")


def test_resolved_config_round_trips_through_yaml(models):
    config = load_config(write_config(models, **minimal(parameters={"time": 3.0}, exclude="*embed*",
                                                        out_shard_size="2MiB", out_dtype="bfloat16")))
    again = parse_config(yaml.safe_load(config.to_yaml()))
    assert again.to_dict() == config.to_dict()
    assert again.parameters["time"] == 3.0 and again.out_shard_size == 2 * 2**20 and again.exclude == ("*embed*",)


def test_relative_paths_resolve_against_the_working_directory_as_mergekit(models, tmp_path_factory, monkeypatch):
    """`mergekit-yaml configs/x.yml out` run from the repository root reads `./base` there; a path
    found only beside the config (swudi-merge's earlier rule) is read from there; a path found in
    both is the working directory's, with a warning naming both."""
    configs = models / "configs"
    configs.mkdir()
    config_path = write_config(configs, **minimal())
    monkeypatch.chdir(models)
    assert load_config(config_path.relative_to(models)).models[0] == (models / "e1.safetensors").resolve()
    ckio.save(configs / "e1.safetensors", {"w": np.zeros((2, 2), np.float32)})
    with pytest.warns(UserWarning, match=r"'e1.safetensors' exists both as .* \(working directory\) and "
                                         r".*configs/e1.safetensors \(beside the config\): reading"):
        assert load_config(config_path).models[0] == (models / "e1.safetensors").resolve()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    beside = write_config(models, **minimal())  # models/merge.yaml, its models beside it
    assert load_config(beside).models == ((models / "e1.safetensors").resolve(), (models / "e2.safetensors").resolve())
    with pytest.raises(ConfigError, match=rf"base.safetensors does not exist in the working directory {elsewhere} "
                                          rf"\(nor beside the config, in {configs}\)"):
        load_config(config_path)


def test_command_line_overrides_replace_file_values(models):
    config = load_config(write_config(models, **minimal(out_shard_size=100)), overrides={"out_shard_size": 7})
    assert config.out_shard_size == 7


@pytest.mark.parametrize("change, message", [
    ({"models": ["e1.safetensors"]}, r"`models` needs at least two experts"),
    ({"models": ["e1.safetensors", "missing.safetensors"]}, r"`models\[1\]`: .*missing.safetensors does not exist"),
    ({"base_model": None}, r"`base_model` is required"),
    ({"merge_method": "swudy"}, r"unknown merge method 'swudy'.*did you mean 'swudi'"),
    ({"parameters": {"temperature": 1}}, r"unknown option.*temperature.*swudi"),
    ({"layout": "jax"}, r"`layout` must be one of"),
    ({"others": "drop"}, r"`others` must be one of"),
    ({"head_patterns": [3]}, r"`head_patterns` must be a pattern"),
    ({"dtype": "int8"}, r"`dtype` must be one of"),
    ({"out_dtype": "int8"}, r"`out_dtype` must be one of"),
    ({"format": "pickle"}, r"`format` must be one of"),
    ({"out_shard_size": "lots"}, r"`out_shard_size` must be a size in bytes"),
    ({"out_shard_size": 0}, r"`out_shard_size` must be positive"),
    ({"scale": "big"}, r"`scale` must be a finite number"),
    ({"exclude": ["re:("]}, r"`exclude`: invalid regular expression"),
    ({"models": [{"model": "e1.safetensors", "weight": 2}, "e2.safetensors"]}, r"mapping with keys.*`model` required"),
])
def test_bad_configs_are_refused_with_the_file_and_key_named(models, change, message):
    path = write_config(models, **{**minimal(), **change})
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_stray_top_level_keys_are_ignored_with_one_warning_suggesting_a_near_key(models):
    """mergekit's schema ignores keys it does not know (`name:`, notes); so does this one, saying so."""
    with pytest.warns(UserWarning, match=r"top-level key\(s\) 'merge_methd' \(did you mean 'merge_method'\?\), "
                                         r"'name' have no effect") as record:
        with pytest.raises(ConfigError, match=r"`merge_method` is required"):
            load_config(write_config(models, **{**minimal(), "merge_methd": "ties_paper", "name": "x",
                                                "merge_method": None}))
    assert len(record) == 1
    with pytest.warns(UserWarning, match=r"'name' have no effect"):
        assert load_config(write_config(models, **minimal(), name="my-merge")).merge_method == "swudi"


def test_unreadable_or_invalid_yaml_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a, b\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_sizes_accept_bytes_and_units():
    assert parse_size(1234, "s") == 1234
    assert parse_size("5GB", "s") == 5 * 10**9
    assert parse_size("5B", "s") == parse_size("5b", "s") == 5 * 10**9  # mergekit's parse_kmb: bytes
    assert (parse_size("500M", "s"), parse_size("7K", "s")) == (5 * 10**8, 7000)
    assert parse_size("1.5 KiB", "s") == 1536
    with pytest.raises(ConfigError):
        parse_size(True, "s")


def test_data_methods_need_a_grams_file(models, monkeypatch):
    from swudi_jax.methods import registry

    probe = registry.MethodSpec(name="gram_probe", fn=lambda tau, grams: tau[0], kind="data", defaults={},
                                 default_scale=1.0, source="test")
    monkeypatch.setitem(registry._METHODS, "gram_probe", probe)
    with pytest.raises(ConfigError, match="needs per-layer input Grams"):
        load_config(write_config(models, **minimal(merge_method="gram_probe")))
    ckio.save(models / "grams.npz", {"w": np.ones((2, 2, 2), np.float32)})
    assert load_config(write_config(models, **minimal(merge_method="gram_probe", grams="grams.npz"))).grams.name == "grams.npz"


def test_binary_yaml_is_reported_with_its_name(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ConfigError, match=r"config .*merge.yaml: not a UTF-8 text file \(byte 0x89 at offset 0\)"):
        load_config(path)


def test_paths_as_given_are_kept_for_what_is_published(models):
    config = load_config(write_config(models, **minimal(grams="base.safetensors")))
    given = config.to_dict(as_given=True)
    assert (given["base_model"], given["models"], given["grams"]) == (
        "base.safetensors", ["e1.safetensors", "e2.safetensors"], "base.safetensors")
    assert config.to_dict()["base_model"] == str((models / "base.safetensors").resolve())
    assert yaml.safe_load(config.to_yaml(as_given=True))["models"] == ["e1.safetensors", "e2.safetensors"]
