"""Mutual TLS between nodes, over real gRPC and real handshakes on loopback.

Only a client holding a certificate of this cluster's CA gets as far as a handler; no certificate,
a self-signed one or one of another cluster fails the TLS handshake itself; a revoked one completes
the handshake but is refused (PERMISSION_DENIED, logged) before the handler runs. A client that
dials node N does not accept node M's (valid) certificate.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from awsomefsd.cluster.ca import ClusterCA, Revocations, new_node_key
from awsomefsd.cluster.generated import join_pb2, join_pb2_grpc
from awsomefsd.cluster.tls import (
    NodeCredentials,
    RevocationGuard,
    authenticated_peer,
    channel_options,
    secure_channel,
    server_credentials,
)
from awsomefsd.rpc.bridge import Binding, client_stream
from tests.cluster.conftest import issue_node, served

CALL_TIMEOUT_S = 5.0


class Probe:
    """A stand-in for any node-to-node service: answers with the caller's verified node id."""

    def __init__(self, ca: ClusterCA, revocations: Revocations) -> None:
        self.ca = ca
        self.revocations = revocations
        self.calls = 0

    async def Challenge(self, request: join_pb2.ChallengeRequest, context: grpc.ServicerContext) -> join_pb2.ChallengeReply:
        self.calls += 1
        caller = authenticated_peer(context, self.ca.cert, self.revocations)
        return join_pb2.ChallengeReply(nonce=caller.node_id.to_bytes(8, "big"))


def call(channel: grpc.Channel) -> int:
    reply = join_pb2_grpc.JoinStub(channel).Challenge(join_pb2.ChallengeRequest(), timeout=CALL_TIMEOUT_S)
    return int.from_bytes(reply.nonce, "big")


def call_status(channel_factory: Callable[[], grpc.Channel]) -> grpc.StatusCode:
    with channel_factory() as channel:
        try:
            call(channel)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def self_signed(node_id: int, cluster_id: uuid.UUID) -> NodeCredentials:
    """A certificate that claims to be node `node_id` but is signed by its own key (a forgery)."""
    key = new_node_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"n{node_id}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(f"{cluster_id.hex}.awsomefs"),
            x509.UniformResourceIdentifier(f"awsomefs://{cluster_id}/node/{node_id}"),
        ]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return NodeCredentials(key, cert, cert)


@pytest.fixture
def revocations() -> Revocations:
    return Revocations()


def guarded_probe(ca: ClusterCA, revocations: Revocations) -> tuple[Probe, Binding]:
    probe = Probe(ca, revocations)
    return probe, Binding(join_pb2_grpc.add_JoinServicer_to_server, RevocationGuard(probe, lambda: ca.cert, revocations))


async def test_member_certificate_is_accepted_and_identified(ca: ClusterCA, revocations: Revocations) -> None:
    server, client = issue_node(ca, 1), issue_node(ca, 2)
    probe, binding = guarded_probe(ca, revocations)
    async with served([binding], server_credentials(server)) as address:
        with secure_channel(address, client, peer_node_id=1) as channel:
            assert await trio.to_thread.run_sync(call, channel) == 2
    assert probe.calls == 1


@pytest.mark.parametrize("kind", ["no certificate", "self-signed", "other cluster's CA"])
async def test_client_without_a_cluster_certificate_fails_the_handshake(
    ca: ClusterCA, other_ca: ClusterCA, revocations: Revocations, kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    server = issue_node(ca, 1)
    probe, binding = guarded_probe(ca, revocations)
    if kind == "no certificate":
        creds = grpc.ssl_channel_credentials(root_certificates=server.ca_pem)
    else:
        forged = self_signed(2, ca.cluster_id) if kind == "self-signed" else issue_node(other_ca, 2)
        # The forger trusts our CA (it is public), so only its own certificate can fail.
        creds = grpc.ssl_channel_credentials(server.ca_pem, forged.key_pem, forged.cert_pem)
    async with served([binding], server_credentials(server)) as address:
        status = await trio.to_thread.run_sync(
            call_status, lambda: grpc.secure_channel(address, creds, options=channel_options(ca.cluster_id, 1))
        )
    assert status == grpc.StatusCode.UNAVAILABLE
    assert probe.calls == 0, "a handler ran for a client the handshake should have refused"
    # gRPC core logs the refused handshake on the server side.
    assert "Handshake failed" in capfd.readouterr().err


async def test_revoked_certificate_is_refused_and_logged(
    ca: ClusterCA, revocations: Revocations, caplog: pytest.LogCaptureFixture
) -> None:
    """Revocation also cuts a connection that is already open: it is checked on every call."""
    server, client = issue_node(ca, 1), issue_node(ca, 2)
    probe, binding = guarded_probe(ca, revocations)

    def status(channel: grpc.Channel) -> grpc.StatusCode:
        try:
            call(channel)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async with served([binding], server_credentials(server)) as address:
        with secure_channel(address, client, peer_node_id=1) as channel:
            assert await trio.to_thread.run_sync(status, channel) == grpc.StatusCode.OK
            revocations.revoke(client.cert.serial_number)
            with caplog.at_level(logging.WARNING, logger="awsomefsd.cluster.tls"):
                assert await trio.to_thread.run_sync(status, channel) == grpc.StatusCode.PERMISSION_DENIED
        assert await trio.to_thread.run_sync(
            call_status, lambda: secure_channel(address, client, peer_node_id=1)
        ) == grpc.StatusCode.PERMISSION_DENIED
    assert probe.calls == 1
    refusals = [r.getMessage() for r in caplog.records if r.name == "awsomefsd.cluster.tls"]
    assert any(f"{client.cert.serial_number:x} is revoked" in m and "127.0.0.1" in m for m in refusals)


async def test_dialling_node_n_does_not_accept_node_m(ca: ClusterCA, revocations: Revocations) -> None:
    server, client = issue_node(ca, 1), issue_node(ca, 2)
    probe, binding = guarded_probe(ca, revocations)
    async with served([binding], server_credentials(server)) as address:
        status = await trio.to_thread.run_sync(call_status, lambda: secure_channel(address, client, peer_node_id=3))
    assert status == grpc.StatusCode.UNAVAILABLE
    assert probe.calls == 0


async def test_server_of_another_cluster_is_not_trusted(
    ca: ClusterCA, other_ca: ClusterCA, revocations: Revocations
) -> None:
    server, client = issue_node(other_ca, 1), issue_node(ca, 2)
    probe, binding = guarded_probe(other_ca, revocations)
    async with served([binding], server_credentials(server)) as address:
        status = await trio.to_thread.run_sync(call_status, lambda: secure_channel(address, client, peer_node_id=1))
    assert status == grpc.StatusCode.UNAVAILABLE
    assert probe.calls == 0


def test_credentials_round_trip_through_the_state_directory(ca: ClusterCA, tmp_path: Path) -> None:
    state = tmp_path
    node = issue_node(ca, 7)
    node.save(state)
    loaded = NodeCredentials.load(state)
    assert loaded.identity == node.identity and loaded.cluster_id == ca.cluster_id
    assert (state / "node.key").stat().st_mode & 0o777 == 0o600


class Streamer:
    """A client-streaming service like the Raft transport's `Send`: frames in, a count out."""

    def __init__(self) -> None:
        self.frames = 0

    @client_stream
    async def Send(self, requests: trio.MemoryReceiveChannel[bytes], context: grpc.ServicerContext) -> bytes:
        async for _ in requests:
            self.frames += 1
        return str(self.frames).encode()


def add_streamer(servicer: Any, server: grpc.Server) -> None:
    handlers = {"Send": grpc.stream_unary_rpc_method_handler(servicer.Send)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Stream", handlers),))


async def test_guard_keeps_client_streams_streaming_and_refuses_revoked(
    ca: ClusterCA, revocations: Revocations
) -> None:
    server, client = issue_node(ca, 1), issue_node(ca, 2)
    streamer = Streamer()
    binding = Binding(add_streamer, RevocationGuard(streamer, lambda: ca.cert, revocations))

    def send_three(channel: grpc.Channel) -> bytes | grpc.StatusCode:
        try:
            return channel.stream_unary("/test.Stream/Send")(iter([b"a", b"b", b"c"]), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code()

    async with served([binding], server_credentials(server)) as address:
        with secure_channel(address, client, peer_node_id=1) as channel:
            assert await trio.to_thread.run_sync(send_three, channel) == b"3"
            revocations.revoke(client.cert.serial_number)
            assert await trio.to_thread.run_sync(send_three, channel) == grpc.StatusCode.PERMISSION_DENIED
    assert streamer.frames == 3


async def test_revocation_cuts_a_client_stream_that_is_already_open(ca: ClusterCA, revocations: Revocations) -> None:
    server, client = issue_node(ca, 1), issue_node(ca, 2)
    streamer = Streamer()
    binding = Binding(add_streamer, RevocationGuard(streamer, lambda: ca.cert, revocations))
    first_frame_in = threading.Event()

    def frames() -> Iterator[bytes]:
        yield b"before"
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while streamer.frames < 1:  # the server has taken the first frame: the stream is open
            assert time.monotonic() < deadline, "first frame never arrived"
            time.sleep(0.01)
        revocations.revoke(client.cert.serial_number)
        first_frame_in.set()
        yield b"after"

    def stream(channel: grpc.Channel) -> bytes | grpc.StatusCode:
        try:
            return channel.stream_unary("/test.Stream/Send")(frames(), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code()

    async with served([binding], server_credentials(server)) as address:
        with secure_channel(address, client, peer_node_id=1) as channel:
            assert await trio.to_thread.run_sync(stream, channel) == grpc.StatusCode.PERMISSION_DENIED
    assert first_frame_in.is_set() and streamer.frames == 1
