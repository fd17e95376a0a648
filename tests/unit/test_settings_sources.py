"""Where settings come from: flags over `AWSOMEFS_*` variables over the TOML file over defaults,
merged key by key (awsomefsd/config/__init__.py, which reads the environment itself since it no longer
imports pydantic-settings)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from awsomefsd.cli.actions import settings_from
from awsomefsd.config import Settings
from awsomefsd.errors import OperatorError


def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str],
         flags: dict[str, object] | None = None) -> Settings:
    config = tmp_path / "awsomefsd.toml"
    config.write_text(toml)
    for name in [name for name in os.environ if name.upper().startswith("AWSOMEFS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings_from(config, flags or {}, read_default_file=False)


def test_flags_over_environment_over_file_key_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(tmp_path, monkeypatch, '[mount]\npath = "/from/file"\nentry_timeout_s = 5\n[metrics]\nport = 1\n',
                    {"AWSOMEFS_MOUNT__ENTRY_TIMEOUT_S": "7", "AWSOMEFS_METRICS__PORT": "2"},
                    {"metrics": {"port": 3}})
    assert settings.mount.path == Path("/from/file")  # only the file names it
    assert settings.mount.entry_timeout_s == 7.0  # the environment over the file
    assert settings.metrics.port == 3  # the flag over both
    assert settings.mount.attr_timeout_s == 60.0  # nobody names it: the default


def test_environment_names_lists_and_whole_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(tmp_path, monkeypatch, "", {
        "awsomefs_mount__fd_keeper": "/run/keeper.sock",  # any case
        "AWSOMEFS_CLUSTER__PEERS": '["a:7000", "b:7000"]',  # a list is JSON
        "AWSOMEFS_TIER": '{"endpoint": "http://s3:9000", "bucket": "b"}',  # a whole section
        "AWSOMEFS_TIER__BUCKET": "over",  # a key over its section's JSON
        "AWSOMEFS_TIER__CACHE_BYTES": "2G",
        "AWSOMEFS_SEED": "12",  # no section: a test's, not a setting
    })
    assert settings.mount.fd_keeper == Path("/run/keeper.sock")
    assert settings.cluster.peers == ["a:7000", "b:7000"]
    assert (settings.tier.endpoint, settings.tier.bucket, settings.tier.cache_bytes) == ("http://s3:9000", "over", 2 << 30)


@pytest.mark.parametrize(("env", "says"), [
    ({"AWSOMEFS_MOUNT__ENDPONT": "x"}, "mount.endpont"),
    ({"AWSOMEFS_CLUSTER__PEERS": "a:7000"}, "AWSOMEFS_CLUSTER__PEERS: not JSON"),
    ({"AWSOMEFS_METRICS__PORT": "many"}, "metrics.port"),
    ({"AWSOMEFS_TIER": "[1]"}, "AWSOMEFS_TIER: not a JSON object"),
])
def test_a_wrong_variable_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                env: dict[str, str], says: str) -> None:
    with pytest.raises(OperatorError) as caught:
        load(tmp_path, monkeypatch, "", env)
    assert str(caught.value).startswith("invalid settings: ") and says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_file_that_is_no_toml_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OperatorError, match=r"^invalid settings: Expected '=' after a key"):
        load(tmp_path, monkeypatch, "this is no TOML\n", {})
