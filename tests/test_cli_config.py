"""`shardqa config`, and settings or shards configs the CLI rejects in one line
naming what is wrong."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from shardqa.cli import app, main
from shardqa.config import get_settings


@pytest.fixture
def env(monkeypatch):
    """Set SHARDQA_* variables for one test (the settings are cached per process)."""

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield set_env
    monkeypatch.undo()
    get_settings.cache_clear()


def test_config_prints_the_settings_in_force(env):
    env(SHARDQA_PORT="8123", SHARDQA_READ_FIRST_STOP_LOGIT="inf", SHARDQA_CACHE_URL="redis://user:s3cret@cache:6379/1",
        SHARDQA_ONNX_PROVIDERS="CUDAExecutionProvider,CPUExecutionProvider")
    result = CliRunner().invoke(app, ["config", "--json"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.stdout)
    assert set(values) == set(get_settings().model_dump())
    assert values["port"] == 8123 and values["host"] == "127.0.0.1" and values["ray_address"] is None
    assert values["read_first_stop_logit"] == "inf"  # JSON has no inf
    assert values["onnx_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert values["cache_url"] == "redis://user:***@cache:6379/1" and "s3cret" not in result.stdout

    table = CliRunner().invoke(app, ["config"])
    assert table.exit_code == 0, table.output
    assert "8123" in table.stdout and "s3cret" not in table.stdout and "SHARDQA_<NAME>" in table.stdout


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["shardqa", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_a_bad_setting_in_the_environment_is_one_line(env, monkeypatch, capsys):
    env(SHARDQA_PORT="0")
    code, err = run_main(monkeypatch, capsys, "config")
    assert code == 2 and err == "error: invalid setting SHARDQA_PORT='0': Input should be greater than or equal to 1\n"


def test_a_setting_pydantic_settings_cannot_decode_is_one_line(monkeypatch, capsys):
    from pydantic_settings import SettingsError

    def broken(**_):
        try:
            raise ValueError("Expecting value: line 1 column 1 (char 0)\nmore detail")
        except ValueError as exc:
            raise SettingsError('error parsing value for field "x" from source "EnvSettingsSource"') from exc

    monkeypatch.setattr("shardqa.cli.app", broken)
    code, err = run_main(monkeypatch, capsys)
    assert code == 2
    assert err == ('error: invalid setting: error parsing value for field "x" from source "EnvSettingsSource" '
                   "(Expecting value: line 1 column 1 (char 0))\n")


def test_an_override_out_of_range_is_one_line_naming_the_field():
    from shardqa.services.service_config import ServiceConfigError, settings_with

    with pytest.raises(ServiceConfigError) as err:
        settings_with({"port": 70000})
    assert str(err.value) == "invalid setting port=70000: Input should be less than or equal to 65535"


@pytest.mark.parametrize("config, message", [
    ({"default": {"replicas": 2, "num_cpu": 1}},
     "shards config 'default': unknown key(s) 'num_cpu' (did you mean num_cpus?); expected replicas, num_cpus, num_gpus"),
    ({"shards": {"1": {"replicas": 1, "num_gpu": 1, "memory": 2}}},
     "shards config shard 1: unknown key(s) 'num_gpu' (did you mean num_gpus?), 'memory'; expected replicas, num_cpus, num_gpus"),
    ({"defaults": {"replicas": 2}},
     "a shards config is a mapping with the keys \"default\" and/or \"shards\", not 'defaults' (did you mean default?)"),
])
def test_a_shards_config_names_its_unknown_keys(config, message, tmp_path):
    from shardqa.services.service_config import ServiceConfigError, load_shards_config, make_service_config

    with pytest.raises(ServiceConfigError) as err:
        make_service_config(get_settings(), 2, load_shards_config(config))
    assert str(err.value) == message

    yaml_file = tmp_path / "shards.yaml"
    yaml_file.write_text(json.dumps(config))  # JSON is YAML
    with pytest.raises(ServiceConfigError, match="unknown key|not 'defaults'"):
        make_service_config(get_settings(), 2, load_shards_config(yaml_file))
