"""What a site's pairing listener takes from a caller it cannot authenticate yet, and what this
site tells the other one to reach it at."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.cluster.rpc import ControlError
from awsomefsd.repl.pairing import Pairing, _pairing_request

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
GOOD = {"site": str(uuid.uuid4()), "ca_pem": "-----BEGIN CERTIFICATE-----", "nonce": "00ff", "proof": "ab",
        "addresses": ["10.0.0.1:9450", "[fd00::1]:9450"]}


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(GOOD), "kept"]), JSON, max_size=5), st.booleans())
def test_any_pairing_request_is_read_or_refused_as_malformed_never_anything_else(
        fields: dict[str, Any], over_good: bool) -> None:
    request = {**GOOD, **fields} if over_good else fields
    try:
        peer, ca_pem, nonce, proof, addresses, kept = _pairing_request(request)
    except ValueError:
        return  # INVALID_ARGUMENT for the caller
    assert isinstance(kept, bool)
    assert isinstance(peer, uuid.UUID) and isinstance(ca_pem, bytes) and isinstance(nonce, bytes)
    assert isinstance(proof, bytes) and all(isinstance(a, str) for a in addresses) and len(addresses) <= 16


def test_a_well_formed_request_is_read() -> None:
    peer, _, nonce, _, addresses, kept = _pairing_request(GOOD)
    assert str(peer) == GOOD["site"] and nonce == b"\x00\xff" and addresses == GOOD["addresses"]
    assert not kept, "an older build's request (no `kept`) keeps nothing: a first link"
    assert _pairing_request({**GOOD, "kept": True})[5] is True


def _pairing(listen: str, advertise: list[str]) -> Pairing:
    pairing = Pairing.__new__(Pairing)  # only what `addresses` reads
    pairing.listen = listen
    pairing._advertise = lambda: advertise
    return pairing


@pytest.mark.parametrize("listen", ["0.0.0.0:9450", "[::]:9450"])
def test_a_wildcard_listen_address_without_advertise_is_refused_before_it_reaches_a_token(listen: str) -> None:
    with pytest.raises(ControlError, match=r"wildcard address: set \[site\] advertise"):
        _pairing(listen, [])._reachable_addresses()
    assert _pairing(listen, ["site-a.example.com:9450"])._reachable_addresses() == ["site-a.example.com:9450"]
    assert _pairing("10.0.0.5:9450", [])._reachable_addresses() == ["10.0.0.5:9450"]
