"""Settings: environment, overrides, and errors that name the setting."""

import json
import subprocess
import sys

import pytest

from imgdedup.config import ConfigError, describe, load_settings


def test_environment_and_overrides(monkeypatch):
    monkeypatch.setenv("IMGDEDUP_BATCH_SIZE", "17")
    monkeypatch.setenv("IMGDEDUP_KAFKA_EXTRA", '{"security.protocol": "SSL"}')
    s = load_settings(input_topic="in")
    assert (s.batch_size, s.input_topic) == (17, "in")
    assert s.kafka_common()["security.protocol"] == "SSL"


@pytest.mark.parametrize("overrides, names", [
    ({"batch_size": "zero"}, "batch_size"),
    ({"mih_tables": 3}, "mih_tables"),
    ({"phash_radius": 40}, "phash_radius"),
    ({"verdict_topic": "images"}, "must differ"),
    ({"kafka_extra": {"Bad Key": "x"}}, "kafka_extra"),
    ({"no_such_setting": 1}, "no_such_setting"),
])
def test_invalid_settings_name_the_setting(overrides, names):
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert names in str(info.value)


def test_config_command_masks_secrets_and_fails_clearly():
    env = {"IMGDEDUP_REDIS_URL": "redis://user:hunter2@cache:6379/0", "PATH": ""}
    out = subprocess.run([sys.executable, "-m", "imgdedup", "config"], env=env, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert "hunter2" not in out.stdout and shown["redis_url"] == "redis://user:***@cache:6379/0"
    bad = subprocess.run([sys.executable, "-m", "imgdedup", "--set", "batch_size=-1", "config"],
                         env={"PATH": ""}, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "batch_size" in bad.stderr and "IMGDEDUP_BATCH_SIZE" in bad.stderr


def test_cli_overrides_of_list_and_dict_settings_take_json():
    run = [sys.executable, "-m", "imgdedup", "--set", 'kafka_extra={"security.protocol": "SSL"}',
           "--set", 'file_roots=["/srv/images"]', "config"]
    out = subprocess.run(run, env={"PATH": ""}, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["kafka_extra"] == {"security.protocol": "SSL"} and shown["file_roots"] == ["/srv/images"]
    with pytest.raises(ConfigError, match="kafka_extra.*not JSON"):
        load_settings(kafka_extra="security.protocol=SSL")


def test_every_setting_is_documented():
    for var, _default, text in describe():
        assert var.startswith("IMGDEDUP_") and text, var
