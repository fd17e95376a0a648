"""Joining over the real join listener: TLS pinned by the token's CA fingerprint, proof of the secret.

The right token yields a node certificate that works for mTLS; a wrong or rotated token is refused
with PERMISSION_DENIED and a log line naming the peer; a listener of another cluster is not trusted;
a challenge cannot be used twice.
"""

from __future__ import annotations

import hashlib
import itertools
import logging

import grpc
import pytest
import trio
from cryptography.hazmat.primitives import serialization

from awsomefsd.cluster import tls
from awsomefsd.cluster.ca import ClusterCA, Revocations, make_csr, new_node_key, verify_node_cert
from awsomefsd.cluster.generated import join_pb2, join_pb2_grpc
from awsomefsd.cluster.join_service import (
    NONCE_TTL_S,
    JoinError,
    JoinRefused,
    JoinService,
    fetch_cluster_ca,
    join_cluster,
)
from awsomefsd.cluster.tls import join_server_credentials
from awsomefsd.cluster.token import JoinToken
from awsomefsd.meta.levels import LOG_LEVEL
from tests.cluster.conftest import issue_node, served
from tests.cluster.test_tls import call, guarded_probe


def make_service(ca: ClusterCA, token: JoinToken) -> tuple[JoinService, list[int]]:
    issued: list[int] = []
    ids = itertools.count(2)

    async def assign(_request: object) -> int:
        return next(ids)

    async def record(identity: object, peer: str) -> None:
        issued.append(identity.node_id)  # type: ignore[attr-defined]

    return JoinService(ca, token.verifier(), assign, record), issued


def join_channel(address: str, ca: ClusterCA) -> grpc.Channel:
    """A channel to a join listener for hand-made requests (what join_cluster does after pinning)."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    return grpc.secure_channel(address, creds, options=tls.channel_options(ca.cluster_id))


async def test_right_token_gets_a_working_certificate(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    service, issued = make_service(ca, token)
    member = issue_node(ca, 1)
    async with served([service.binding()], join_server_credentials(member)) as address:
        creds = await trio.to_thread.run_sync(join_cluster, token, address)
    assert verify_node_cert(creds.cert, ca.cert).node_id == 2 == creds.identity.node_id
    assert issued == [2]
    assert creds.ca_cert.public_bytes(serialization.Encoding.DER) == ca.cert.public_bytes(serialization.Encoding.DER)
    # The new certificate opens the member's mutual-TLS listener, and names the joiner there.
    probe, binding = guarded_probe(ca, Revocations())
    async with served([binding], tls.server_credentials(member)) as address:
        with tls.secure_channel(address, creds, peer_node_id=1) as channel:
            assert await trio.to_thread.run_sync(call, channel) == 2
    assert probe.calls == 1


@pytest.mark.parametrize("which", ["wrong", "rotated"])
async def test_wrong_or_rotated_token_is_refused_and_logged(
    ca: ClusterCA, which: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    service, issued = make_service(ca, token)
    stale = JoinToken.generate(ca.cluster_id, ca.fingerprint) if which == "wrong" else token
    if which == "rotated":
        service.rotate(JoinToken.generate(ca.cluster_id, ca.fingerprint).verifier())
    async with served([service.binding()], join_server_credentials(issue_node(ca, 1))) as address:
        with caplog.at_level(logging.WARNING, logger="awsomefsd.cluster.join_service"), \
                pytest.raises(JoinRefused, match="join token refused"):
            await trio.to_thread.run_sync(join_cluster, stale, address)
    assert issued == []
    refusals = [r.getMessage() for r in caplog.records if "refused join from" in r.getMessage()]
    assert refusals and "ipv4:127.0.0.1:" in refusals[0] and "wrong or rotated token" in refusals[0]


async def test_wrong_proof_gets_permission_denied_and_its_challenge_is_spent(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    service, _ = make_service(ca, token)
    wrong = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    async with served([service.binding()], join_server_credentials(issue_node(ca, 1))) as address:

        def status(stub: join_pb2_grpc.JoinStub, request: join_pb2.JoinRequest) -> grpc.StatusCode:
            try:
                stub.Join(request, timeout=5)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        def attempt() -> tuple[grpc.StatusCode, grpc.StatusCode]:
            with join_channel(address, ca) as ch:
                stub = join_pb2_grpc.JoinStub(ch)
                nonce = stub.Challenge(join_pb2.ChallengeRequest(cluster_id=ca.cluster_id.bytes), timeout=5).nonce
                csr = make_csr(new_node_key()).public_bytes(serialization.Encoding.DER)
                request = join_pb2.JoinRequest(
                    cluster_id=ca.cluster_id.bytes, nonce=nonce, csr_der=csr, proof=wrong.prove(nonce, csr)
                )
                with_wrong_proof = status(stub, request)
                request.proof = token.prove(nonce, csr)  # the right proof, but the challenge is used up
                return with_wrong_proof, status(stub, request)

        assert await trio.to_thread.run_sync(attempt) == (grpc.StatusCode.PERMISSION_DENIED,) * 2


async def test_listener_of_another_cluster_is_not_trusted(ca: ClusterCA, other_ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    other_token = JoinToken.generate(other_ca.cluster_id, other_ca.fingerprint)
    service, issued = make_service(other_ca, other_token)
    async with served([service.binding()], join_server_credentials(issue_node(other_ca, 1))) as address:
        with pytest.raises(JoinRefused, match="does not present the cluster CA"):
            await trio.to_thread.run_sync(join_cluster, token, address)
    assert issued == []


async def test_fetch_cluster_ca_returns_only_the_pinned_certificate(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    service, _ = make_service(ca, token)
    async with served([service.binding()], join_server_credentials(issue_node(ca, 1))) as address:
        cert = await trio.to_thread.run_sync(fetch_cluster_ca, address, ca.fingerprint)
        assert cert == ca.cert
        with pytest.raises(JoinRefused):
            await trio.to_thread.run_sync(fetch_cluster_ca, address, hashlib.sha256(b"x").digest())


def test_unreachable_listener_is_a_clear_error(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    with pytest.raises(JoinError, match="cannot reach the join listener"):
        join_cluster(token, "127.0.0.1:1", timeout_s=2)


async def test_expired_challenge_is_refused(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    now = [1000.0]
    issued: list[int] = []

    async def assign(_request: object) -> int:
        issued.append(2)
        return 2

    service = JoinService(ca, token.verifier(), assign, clock=lambda: now[0])
    async with served([service.binding()], join_server_credentials(issue_node(ca, 1))) as address:

        def attempt() -> grpc.StatusCode:
            with join_channel(address, ca) as ch:
                stub = join_pb2_grpc.JoinStub(ch)
                nonce = stub.Challenge(join_pb2.ChallengeRequest(cluster_id=ca.cluster_id.bytes), timeout=5).nonce
                now[0] += NONCE_TTL_S + 1
                csr = make_csr(new_node_key()).public_bytes(serialization.Encoding.DER)
                request = join_pb2.JoinRequest(
                    cluster_id=ca.cluster_id.bytes, nonce=nonce, csr_der=csr, proof=token.prove(nonce, csr)
                )
                try:
                    stub.Join(request, timeout=5)
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        assert await trio.to_thread.run_sync(attempt) == grpc.StatusCode.PERMISSION_DENIED
    assert issued == []


@pytest.mark.parametrize(("joiner_level", "admitted"), [(0, False), (3, False), (4, True)])
async def test_a_build_older_than_the_clusters_log_level_is_refused(
        ca: ClusterCA, joiner_level: int, admitted: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A joiner whose build cannot decode commands the cluster's log already holds would stop
    applying the log at the first (docs/cluster.md, "Rolling upgrades"): refused before it gets a
    node id, saying which build to install. 0 is a build from before the field (level 3)."""
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    issued: list[int] = []

    async def assign(_request: object) -> int:
        issued.append(2)
        return 2

    service = JoinService(ca, token.verifier(), assign, log_level=lambda: 4)
    async with served([service.binding()], join_server_credentials(issue_node(ca, 1))) as address:

        def join_as(level: int) -> grpc.StatusCode:
            with join_channel(address, ca) as ch:
                stub = join_pb2_grpc.JoinStub(ch)
                nonce = stub.Challenge(join_pb2.ChallengeRequest(cluster_id=ca.cluster_id.bytes), timeout=5).nonce
                csr = make_csr(new_node_key()).public_bytes(serialization.Encoding.DER)
                request = join_pb2.JoinRequest(cluster_id=ca.cluster_id.bytes, nonce=nonce, csr_der=csr,
                                               proof=token.prove(nonce, csr), log_level=level)
                try:
                    stub.Join(request, timeout=5)
                except grpc.RpcError as exc:
                    assert "install the awsomefsd the other members run" in (exc.details() or "")
                    return exc.code()
                return grpc.StatusCode.OK

        with caplog.at_level(logging.WARNING, logger="awsomefsd.cluster.join_service"):
            code = await trio.to_thread.run_sync(join_as, joiner_level)
    assert code == (grpc.StatusCode.OK if admitted else grpc.StatusCode.FAILED_PRECONDITION)
    assert issued == ([2] if admitted else [])
    assert admitted or any("decodes log level" in r.getMessage() for r in caplog.records)


async def test_this_build_joins_a_cluster_at_its_own_log_level_not_above(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)

    async def assign(_request: object) -> int:
        return 2

    for cluster_level, refused in ((LOG_LEVEL, False), (LOG_LEVEL + 1, True)):
        service = JoinService(ca, token.verifier(), assign, log_level=lambda level=cluster_level: level)
        async with served([service.binding()], join_server_credentials(issue_node(ca, 1))) as address:
            if refused:
                with pytest.raises(JoinRefused, match=f"up to level {LOG_LEVEL}, and the cluster is at level "
                                                      f"{cluster_level}"):
                    await trio.to_thread.run_sync(join_cluster, token, address)
            else:
                assert (await trio.to_thread.run_sync(join_cluster, token, address)).identity.node_id == 2
