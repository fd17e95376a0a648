"""The start refuses, in one line naming the setting, a listener address another process holds:
the [site] link and pairing listeners too (two sites on one host with the default ports: the
second daemon used to die after `site link` with a traceback)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from awsomefsd.cli.preflight import PortInUse, check_listeners
from awsomefsd.config import Settings
from tests.support.ports import free_port


@pytest.fixture
def held() -> Iterator[tuple[int, socket.socket]]:
    """A free port block's base (tests/support/ports.py), and a listener holding nothing yet (bind it where a test needs)."""
    sock = socket.socket()
    try:
        yield free_port(), sock
    finally:
        sock.close()


def _site(port: int) -> Settings:
    return Settings.model_validate({"site": {"listen": f"127.0.0.1:{port}"}, "metrics": {"enabled": False}})


@pytest.mark.parametrize(("offset", "named"), [(0, "[site] listen"), (1, "the site pairing listener")])
def test_a_site_listener_port_in_use_is_refused_naming_it(held: tuple[int, socket.socket], offset: int,
                                                          named: str) -> None:
    port, sock = held
    sock.bind(("127.0.0.1", port + offset))
    sock.listen()
    with pytest.raises(PortInUse) as caught:
        check_listeners(_site(port))
    assert str(caught.value).startswith(named) and str(port + offset) in str(caught.value)


def test_free_site_ports_pass(held: tuple[int, socket.socket]) -> None:
    port, _ = held
    check_listeners(_site(port))
