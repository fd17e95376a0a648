"""Settings a user writes wrong get one line naming the setting, never a traceback, and are never
silently ignored (what the start would otherwise do with a misspelt key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from awsomefsd.cli.actions import settings_from
from awsomefsd.errors import OperatorError


def load(tmp_path: Path, toml: str) -> object:
    config = tmp_path / "awsomefsd.toml"
    config.write_text(toml)
    return settings_from(config, {}, read_default_file=False)


@pytest.mark.parametrize("section", ["tier", "mount", "cluster", "data"])
def test_a_misspelt_key_in_a_section_is_an_error(tmp_path: Path, section: str) -> None:
    with pytest.raises(OperatorError) as caught:
        load(tmp_path, f'[{section}]\nendpont = "https://s3.example.com"\n')
    message = str(caught.value)
    assert message.startswith("invalid settings: ") and f"{section}.endpont" in message
    assert "\n" not in message


def test_a_size_may_be_a_whole_number_written_as_a_float(tmp_path: Path) -> None:
    settings = load(tmp_path, "[tier]\ncache_bytes = 1.5e9\n")
    assert settings.tier.cache_bytes == 1_500_000_000  # type: ignore[attr-defined]


def test_a_fractional_number_of_bytes_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match=r"^invalid settings: tier\.cache_bytes: .*not a whole number of bytes"):
        load(tmp_path, "[tier]\ncache_bytes = 1.5\n")


@pytest.mark.parametrize(("section", "key", "value"), [
    ("site", "listen", '"abc"'), ("site", "listen", '":9450"'), ("site", "listen", '"10.0.0.5:port"'),
    ("site", "listen", '"10.0.0.5:65535"'), ("site", "advertise", '["10.0.0.5"]'), ("cluster", "listen", '"[::]"'),
])
def test_an_address_that_is_not_host_port_is_refused_in_one_line(tmp_path: Path, section: str, key: str,
                                                                  value: str) -> None:
    with pytest.raises(OperatorError) as caught:
        load(tmp_path, f"[{section}]\n{key} = {value}\n")
    message = str(caught.value)
    assert message.startswith(f"invalid settings: {section}.{key}") and "not host:port" in message
    assert "\n" not in message


def test_addresses_in_every_accepted_form_load(tmp_path: Path) -> None:
    settings = load(tmp_path, '[site]\nlisten = "0.0.0.0:9450"\nadvertise = ["site-a.example.com:9450", '
                              '"[fd00::5]:9450"]\n[cluster]\nlisten = "[::]:7000"\n')
    assert settings.site.advertise == ["site-a.example.com:9450", "[fd00::5]:9450"]  # type: ignore[attr-defined]
    assert settings.cluster.listen == "[::]:7000"  # type: ignore[attr-defined]
