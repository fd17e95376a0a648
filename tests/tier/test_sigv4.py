"""Our request signature equals botocore's, byte for byte, for what tiering sends (the reference
implementation every S3-compatible store is tested against), over generated keys and headers."""

from __future__ import annotations

import datetime
import hashlib
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.tier.sigv4 import EMPTY_SHA256, Credentials, canonical_uri, sign

botocore_auth = pytest.importorskip("botocore.auth")
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials as BotoCredentials  # noqa: E402
from botocore.utils import percent_encode  # noqa: E402

NOW = datetime.datetime(2026, 11, 25, 1, 2, 3, tzinfo=datetime.UTC)
PUNCTUATION = " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
KEYS = st.text(alphabet=st.sampled_from(PUNCTUATION + "aZ09é€😀") | st.characters(blacklist_categories=("Cs", "Cc")),
               min_size=1, max_size=40)


def botocore_authorization(method: str, url: str, headers: dict[str, str], body: bytes, creds: Credentials,
                           region: str) -> dict[str, str]:
    request = AWSRequest(method=method, url=url, headers=headers, data=body)
    boto = BotoCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token or None)
    with mock.patch.object(botocore_auth, "get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        botocore_auth.S3SigV4Auth(boto, "s3", region).add_auth(request)
    return {k: v for k, v in request.headers.items()}


@settings(max_examples=200, deadline=None)
@given(key=KEYS, method=st.sampled_from(["GET", "PUT", "DELETE"]), token=st.sampled_from(["", "tok/en+=="]),
       region=st.sampled_from(["us-east-1", "eu-west-3"]), body=st.binary(max_size=64))
def test_the_signature_is_botocores(key: str, method: str, token: str, region: str, body: bytes) -> None:
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    path = f"/bucket/prefix/{key}"
    body = body if method == "PUT" else b""
    payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    host = "127.0.0.1:9000"
    ours = sign(method, path, {"host": host}, payload, NOW, region, creds)
    url = f"http://{host}{percent_encode(path, safe='/~')}"  # as botocore's serializer encodes a key
    assert canonical_uri(path) == percent_encode(path, safe="/~")
    theirs = botocore_authorization(method, url, {"X-Amz-Content-SHA256": payload}, body, creds, region)
    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["x-amz-date"] == theirs["X-Amz-Date"]
    if token:
        assert ours["x-amz-security-token"] == theirs["X-Amz-Security-Token"]


def test_the_secret_never_shows_in_a_repr() -> None:
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    assert "wJalr" not in repr(creds) and "AKIDEXAMPLE" in repr(creds)
