from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lorafleet.core.config import ConfigError, ServiceSettings, load_settings


class ExampleSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_EXAMPLE_")

    db_url: str = Field(default="sqlite:///:memory:", description="Database URL.")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("LORAFLEET_"):
            monkeypatch.delenv(key)


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "example.yaml"
    path.write_text("port: 1000\ngrace_period_s: 3\ndb_url: sqlite:///from-file.db\n")
    return path


def test_defaults():
    settings = load_settings(ExampleSettings)
    assert settings.host == "127.0.0.1"
    assert settings.port == 0
    assert settings.grace_period_s == 10
    assert settings.max_message_bytes == 64 * 1024 * 1024
    assert settings.metrics_port is None
    assert settings.log_format == "auto"
    assert settings.address == "127.0.0.1:0"


def test_every_field_is_described():
    for name, info in ExampleSettings.model_fields.items():
        assert info.description, name


def test_precedence_file_env_override(yaml_file, monkeypatch):
    assert load_settings(ExampleSettings, yaml_file).port == 1000

    monkeypatch.setenv("LORAFLEET_EXAMPLE_PORT", "2000")
    settings = load_settings(ExampleSettings, yaml_file)
    assert settings.port == 2000
    assert settings.grace_period_s == 3  # still from the file
    assert settings.db_url == "sqlite:///from-file.db"

    settings = load_settings(ExampleSettings, yaml_file, port=3000, db_url=None)
    assert settings.port == 3000
    assert settings.db_url == "sqlite:///from-file.db"  # None override is "not given"


def test_env_prefix_is_per_service(monkeypatch):
    monkeypatch.setenv("LORAFLEET_PORT", "1234")  # the base prefix, not ours
    assert load_settings(ExampleSettings).port == 0
    assert load_settings(ServiceSettings).port == 1234


def test_toml_file(tmp_path):
    path = tmp_path / "example.toml"
    path.write_text('host = "0.0.0.0"\nlog_level = "DEBUG"\nmetrics_port = 9100\n')
    settings = load_settings(ExampleSettings, path)
    assert (settings.host, settings.log_level, settings.metrics_port) == ("0.0.0.0", "debug", 9100)


def test_file_does_not_leak_into_later_loads(yaml_file):
    load_settings(ExampleSettings, yaml_file)
    assert ExampleSettings().port == 0


def test_unknown_key_in_file_rejected(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("prot: 50051\n")
    with pytest.raises(ConfigError) as info:
        load_settings(ExampleSettings, path)
    message = info.value.message
    assert "unknown setting 'prot'" in message
    assert "did you mean 'port'?" in message
    assert str(path) in message
    assert info.value.reason == "INVALID_CONFIG"


def test_unknown_override_rejected():
    with pytest.raises(ConfigError, match="unknown setting 'bogus' in overrides"):
        load_settings(ExampleSettings, bogus=1)


def test_invalid_value_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("port: 70000\n")
    with pytest.raises(ConfigError, match="port"):
        load_settings(ExampleSettings, path)


def test_missing_or_unsupported_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(ExampleSettings, tmp_path / "absent.yaml")
    ini = tmp_path / "x.ini"
    ini.write_text("port=1\n")
    with pytest.raises(ConfigError, match="unsupported suffix"):
        load_settings(ExampleSettings, ini)


def test_ipv6_address():
    assert ServiceSettings(host="::", port=5).address == "[::]:5"


def test_unknown_env_var_under_the_service_prefix_rejected(monkeypatch):
    monkeypatch.setenv("LORAFLEET_EXAMPLE_DB_URI", "sqlite:///typo.db")  # db_url misspelt
    with pytest.raises(ConfigError) as info:
        load_settings(ExampleSettings)
    message = info.value.message
    assert "unknown setting 'db_uri' in environment variable LORAFLEET_EXAMPLE_DB_URI" in message
    assert "did you mean 'db_url'?" in message
    assert "(known: " in message and "host" in message  # the known names are listed
    assert info.value.reason == "INVALID_CONFIG"


def test_env_vars_outside_the_service_prefix_are_not_its_business(monkeypatch):
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", "/tmp/cache")  # shared prefix, not a setting
    monkeypatch.setenv("LORAFLEET_OTHER_THING", "1")  # another service's prefix
    monkeypatch.setenv("lorafleet_example_port", "7")  # known setting, any case
    assert load_settings(ExampleSettings).port == 7
    assert load_settings(ServiceSettings).port == 0
