"""The Raft transport between two in-process endpoints: batching, order, drops, reconnects,
malformed input, chunked snapshots, mutual TLS on the wire and on gRPC, and the gRPC path an older
build is sent to. Real grpc, real trio TLS, real sockets on loopback."""

from __future__ import annotations

import functools
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from awsomefsd.cluster.ca import ClusterCA, Revocations, make_csr, new_node_key
from awsomefsd.cluster.tls import (
    NodeCredentials,
    authenticated_peer,
    channel_credentials,
    channel_options,
    server_credentials,
    wire_security,
)
from awsomefsd.config.addresses import split_host_port
from awsomefsd.meta.raft import (
    CodecError,
    ConfState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
    encode_message,
)
from awsomefsd.meta.replication.errors import ProposalTimeout
from awsomefsd.meta.replication.transport import WIRE_PORT_OFFSET, RaftTransport, TransportLimits
from awsomefsd.meta.replication.transport_grpc import SERVICE, decode_frame, encode_frame
from awsomefsd.meta.replication.transport_peer import GRPC_POLL_S, WIRE_PROBE_S
from awsomefsd.meta.replication.wire_calls import KIND_HOLDER, WireUnavailable
from awsomefsd.rpc import wire
from awsomefsd.rpc.bridge import Binding, client_stream, serve_grpc
from tests.support.ports import free_port

DEADLINE_S = 10.0
FAST = TransportLimits(backoff_min_s=0.02, backoff_max_s=0.2)


class Recorder:
    """The node side of a transport, recording what arrives."""

    def __init__(self, chunks: list[bytes] | None = None) -> None:
        self.got: list[Message] = []
        self.unreachable: list[int] = []
        self.snapshots: list[tuple[int, bool]] = []
        self.chunks = chunks or [b"a" * 1000, b"b" * 10]
        self.changed = trio.Event()

    def deliver(self, messages: list[Message]) -> None:
        self.got.extend(messages)
        self._poke()

    def report_unreachable(self, peer_id: int) -> None:
        self.unreachable.append(peer_id)
        self._poke()

    def report_snapshot(self, peer_id: int, delivered: bool) -> None:
        self.snapshots.append((peer_id, delivered))
        self._poke()

    def snapshot_chunks(self) -> Iterator[bytes]:
        yield from self.chunks

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, cond: object) -> None:
        with trio.fail_after(DEADLINE_S):
            while not cond():  # type: ignore[operator]
                await self.changed.wait()


def heartbeat(i: int, to: int = 2) -> Message:
    return Message(MessageType.HEARTBEAT, to=to, frm=1, term=3, index=i)


def addresses() -> dict[int, str]:
    return {1: f"127.0.0.1:{free_port('127.0.0.1')}", 2: f"127.0.0.1:{free_port('127.0.0.1')}"}


def pair(tmp_path: Path, addrs: dict[int, str], **kw: object) -> tuple[RaftTransport, Recorder, RaftTransport, Recorder]:
    ra, rb = Recorder(), Recorder()
    a = RaftTransport(1, {2: addrs[2]}, staging_dir=tmp_path / "a", limits=FAST, **kw)  # type: ignore[arg-type]
    b = RaftTransport(2, {1: addrs[1]}, staging_dir=tmp_path / "b", limits=FAST, **kw)  # type: ignore[arg-type]
    return a, ra, b, rb


def test_plaintext_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TLS"):
        RaftTransport(1, {2: "127.0.0.1:1"}, staging_dir=tmp_path)


def test_frames_round_trip_and_refuse_malformed_bytes() -> None:
    msgs = [heartbeat(i) for i in range(5)]
    assert decode_frame(encode_frame(msgs)) == msgs
    frame = encode_frame(msgs)
    for bad in (b"", frame[:-1], frame + b"x", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff" + frame[4:]):
        with pytest.raises(CodecError):
            decode_frame(bad)


def test_full_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    t = RaftTransport(1, {2: "127.0.0.1:1"}, staging_dir=tmp_path, insecure=True,
                      limits=TransportLimits(queue_messages=10))
    t.send([heartbeat(i) for i in range(100)])  # not running: nothing drains the queue
    t.send([heartbeat(0, to=9)])  # unknown peer: dropped, no error
    assert t.stats()[2]["dropped"] == 90


async def test_messages_arrive_in_order_batched_into_few_frames(tmp_path: Path) -> None:
    addrs = addresses()
    a, ra, b, rb = pair(tmp_path, addrs, insecure=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])
        await nursery.start(a.run, ra, addrs[1])
        a.send([heartbeat(i) for i in range(2000)])
        await rb.until(lambda: len(rb.got) >= 2000)
        assert [m.index for m in rb.got] == list(range(2000))
        assert a.stats()[2]["sent_frames"] < 2000 / 4, a.stats()
        nursery.cancel_scope.cancel()


async def test_unreachable_peer_is_reported_and_reconnected(tmp_path: Path) -> None:
    addrs = addresses()
    a, ra, b, rb = pair(tmp_path, addrs, insecure=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run, ra, addrs[1])
        a.send([heartbeat(0)])
        await ra.until(lambda: 2 in ra.unreachable)
        await nursery.start(b.run, rb, addrs[2])
        # Messages queued while the stream was down are discarded; keep sending until one arrives.
        with trio.fail_after(DEADLINE_S):
            while not rb.got:
                a.send([heartbeat(1)])
                await trio.sleep(0.05)
        assert rb.got[0].index == 1
        nursery.cancel_scope.cancel()


async def test_malformed_frame_is_refused_and_nothing_delivered(tmp_path: Path) -> None:
    addrs = addresses()
    _, _, b, rb = pair(tmp_path, addrs, insecure=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])

        def send_garbage() -> grpc.StatusCode:
            with grpc.insecure_channel(addrs[2]) as ch:
                try:
                    ch.stream_unary(f"/{SERVICE}/Send")(iter([b"\x05\x00\x00\x00junk"]), timeout=5)
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        assert await trio.to_thread.run_sync(send_garbage) == grpc.StatusCode.INVALID_ARGUMENT
        assert b.rejected_frames == 1 and not rb.got
        nursery.cancel_scope.cancel()


async def test_malformed_wire_frame_is_refused_and_nothing_delivered(tmp_path: Path) -> None:
    addrs = addresses()
    _, _, b, rb = pair(tmp_path, addrs, insecure=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])
        host, port = split_host_port(addrs[2])
        stream = await wire.dial(host, port + WIRE_PORT_OFFSET, ssl_context=None, server_hostname=None,
                                 max_frame_bytes=1 << 20)
        await stream.send_frame(encode_frame([heartbeat(1)])[:-1])  # one byte short of its message
        with trio.fail_after(DEADLINE_S):
            while not b.rejected_frames:
                await trio.sleep(0.01)
        assert not rb.got
        await stream.close_now()
        nursery.cancel_scope.cancel()


class OlderBuild(RaftTransport):
    """A transport as builds from before the wire run it: gRPC only, nothing on the wire port."""

    async def _serve_wire(self, host: str, port: int, *,
                          task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(0)


async def test_a_peer_without_the_wire_is_sent_to_over_grpc_in_order(tmp_path: Path) -> None:
    """A rolling upgrade: the new build's messages reach an older build (and the other way round)."""
    addrs = addresses()
    ra, rb = Recorder(), Recorder()
    a = RaftTransport(1, {2: addrs[2]}, staging_dir=tmp_path / "a", limits=FAST, insecure=True)
    b = OlderBuild(2, {1: addrs[1]}, staging_dir=tmp_path / "b", limits=FAST, insecure=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])
        await nursery.start(a.run, ra, addrs[1])
        with trio.fail_after(DEADLINE_S):
            while not rb.got:
                a.send([heartbeat(0)])
                await trio.sleep(0.05)
        a.send([heartbeat(i) for i in range(1, 500)])
        await rb.until(lambda: rb.got[-1].index == 499)
        assert [m.index for m in rb.got if m.index] == list(range(1, 500))
        assert a.stats()[2]["legacy_frames"] >= 1
        with trio.fail_after(DEADLINE_S):  # b may still be between attempts: what it queued then is dropped
            while not ra.got:
                b.send([Message(MessageType.HEARTBEAT_RESP, to=1, frm=2, term=3, index=5)])
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_a_peer_on_grpc_has_its_wire_probed_soon_then_ever_less_often(tmp_path: Path) -> None:
    """A refused wire is mostly a member of this build restarting (its gRPC listener may answer
    before its wire's): the sender tries the wire again within a fraction of a second, where it
    waited WIRE_PROBE_S (2 s) and every wire call to the member (a look, a read point, their
    answers) waited with it; an older build, which never answers on the wire, is probed ever
    less often, at most every WIRE_PROBE_S."""
    addrs = addresses()
    a = RaftTransport(1, {2: addrs[2]}, staging_dir=tmp_path / "a", limits=FAST, insecure=True)
    b = OlderBuild(2, {1: addrs[1]}, staging_dir=tmp_path / "b", limits=FAST, insecure=True)
    ra, rb = Recorder(), Recorder()
    probes: list[float] = []
    dial = a._dial_wire

    async def counted(peer: Any) -> Any:
        if a._peers[2].on_grpc:
            probes.append(trio.current_time())
        return await dial(peer)

    a._dial_wire = counted  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])
        await nursery.start(a.run, ra, addrs[1])
        with trio.fail_after(DEADLINE_S):
            while not rb.got:  # on gRPC, the stream open
                a.send([heartbeat(0)])
                await trio.sleep(0.05)
        since = trio.current_time()
        await trio.sleep(3.0)  # (how often the wire is tried over a span of time)
        during = [t - since for t in probes if t >= since]
        assert any(t < 1.0 for t in during), f"no probe of the wire in the first second on gRPC: {during}"
        assert len(during) <= 10, f"the wire of an older build probed {len(during)} times in 3 s"
        nursery.cancel_scope.cancel()


def test_a_failed_grpc_stream_takes_nothing_queued_after_it_ended(tmp_path: Path) -> None:
    """grpc pulls a stream's frames in a thread of its own, which may still be waiting on the
    queue when the call has failed; what is queued once the stream has ended (for the connection
    that follows) must stay for that connection, not vanish into the dead call."""
    t = RaftTransport(1, {2: f"127.0.0.1:{free_port('127.0.0.1')}"}, staging_dir=tmp_path, insecure=True,
                      limits=FAST)
    peer = t._peers[2]
    for _ in range(5):  # nothing listens: each call fails at once, its generator mid-poll
        assert t._stream_once(peer) == "StatusCode.UNAVAILABLE"
        t.send([heartbeat(7)])
        time.sleep(GRPC_POLL_S * 1.5)  # a left-over generator's poll has ended by now
        assert peer.queue.qsize() == 1, "a dead stream's generator took a message queued after it"
        assert peer.queue.get_nowait().index == 7
    assert t.stats()[2]["legacy_frames"] == 0


async def test_a_sender_that_found_no_wire_moves_to_it_once_the_peer_listens(tmp_path: Path) -> None:
    """A peer started while its wire was refused is not left on gRPC: the wire is tried again."""
    addrs = addresses()
    a, ra, b, rb = pair(tmp_path, addrs, insecure=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run, ra, addrs[1])
        await nursery.start(b.run, rb, addrs[2])
        with trio.fail_after(DEADLINE_S + WIRE_PROBE_S):
            while True:
                a.send([heartbeat(1)])
                await trio.sleep(0.05)
                legacy = a.stats()[2]["legacy_frames"]
                if rb.got and a.stats()[2]["sent_frames"] > legacy:
                    break
        a.send([heartbeat(i) for i in range(2, 200)])
        await rb.until(lambda: rb.got[-1].index == 199)
        assert a.stats()[2]["legacy_frames"] == legacy, "frames still went over gRPC after the wire answered"
        nursery.cancel_scope.cancel()


async def test_a_forward_whose_connection_ends_fails_at_once(tmp_path: Path) -> None:
    """A forwarded entry waiting for its answer when the connection to the leader ends fails with
    OSError (forwarding then sends it again), not at the call's deadline."""
    addrs = addresses()
    a, ra, b, rb = pair(tmp_path, addrs, insecure=True)
    asked = trio.Event()

    async def never_answers(entry: bytes) -> int:
        asked.set()
        await trio.sleep_forever()
        raise AssertionError

    async with trio.open_nursery() as nursery:
        b_scope = trio.CancelScope()

        async def run_b(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            with b_scope:
                await b.run(rb, addrs[2], accept_forward=never_answers, task_status=task_status)

        await nursery.start(run_b)  # first: a finds b's wire at once (not gRPC meanwhile)
        await nursery.start(a.run, ra, addrs[1])
        with trio.fail_after(DEADLINE_S):
            while not rb.got:
                a.send([heartbeat(0)])
                await trio.sleep(0.02)

        async def forward_and_check() -> None:
            with trio.fail_after(DEADLINE_S), pytest.raises(OSError):
                await a.forward(2, b"entry", timeout_s=60)
            nursery.cancel_scope.cancel()

        nursery.start_soon(forward_and_check)
        await asked.wait()
        b_scope.cancel()  # b stops: its end of the connection closes
        while True:  # Raft's heartbeats: the next send finds the connection gone
            a.send([heartbeat(1)])
            await trio.sleep(0.02)


async def test_an_answer_made_while_the_connection_back_is_redialled_still_arrives(tmp_path: Path) -> None:
    """A call (a holder's look here; a read point alike) comes on the asker's connection; the
    answer goes on ours, which may be down while it is redialled (the asker restarted). It waits
    for the next connection, as Raft's messages do: dropped, the asker waited out its whole call
    (a nemesis run, 2 s)."""
    addrs = addresses()
    slow = TransportLimits(backoff_min_s=2.0, backoff_max_s=2.0)  # (jittered: 1-2 s down)
    a = RaftTransport(1, {2: addrs[2]}, staging_dir=tmp_path / "a", limits=FAST, insecure=True)
    b = RaftTransport(2, {1: addrs[1]}, staging_dir=tmp_path / "b", limits=slow, insecure=True)
    ra, rb = Recorder(), Recorder()

    async def serve(kind: str, request: bytes) -> bytes:
        return b"served " + request

    b.serve_holder = serve
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])
        await nursery.start(a.run, ra, addrs[1])
        with trio.fail_after(DEADLINE_S):
            while True:  # both wire connections open
                try:
                    assert await a.ask_holder(2, "look", b"x", timeout_s=1) == b"served x"
                    break
                except (WireUnavailable, ConnectionError):
                    await trio.sleep(0.02)
            connection = b._peers[1].connection
            assert connection is not None
            connection.cancel()  # b's connection to a drops; b redials after its back-off
            while b._peers[1].connection is not None:
                await trio.sleep(0.001)
            assert await a.ask_holder(2, "look", b"y", timeout_s=DEADLINE_S) == b"served y"
            assert b._peers[1].connection is not None, "answered before b's connection came back?"
        nursery.cancel_scope.cancel()


async def test_a_leader_is_asked_for_a_read_point_on_the_wire_only_while_its_messages_arrive_there(
        tmp_path: Path) -> None:
    """The leader's answer goes on its own connection to us: while none of its Raft messages
    reach us on the wire (that connection is down, or the leader sends to us over gRPC, as it
    does for a while to a member that was restarting), the read goes through Raft's ReadIndex at
    once (WireUnavailable) instead of waiting for an answer that cannot come."""
    addrs = addresses()
    a, ra, b, rb = pair(tmp_path, addrs, insecure=True)
    b.read_point = lambda: 42
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])
        await nursery.start(a.run, ra, addrs[1])
        with trio.fail_after(DEADLINE_S):
            while b._peers[1].connection is None or a._peers[2].connection is None:
                await trio.sleep(0.02)
        with pytest.raises(WireUnavailable):  # nothing heard from b on the wire yet
            await a.ask_read_point(2, timeout_s=DEADLINE_S)
        with trio.fail_after(DEADLINE_S):
            while not ra.got:
                b.send([Message(MessageType.HEARTBEAT, to=1, frm=2, term=3)])
                await trio.sleep(0.02)
        assert await a.ask_read_point(2, timeout_s=DEADLINE_S) == 42
        nursery.cancel_scope.cancel()


async def test_a_forward_that_comes_before_grpc_serves_is_answered(tmp_path: Path) -> None:
    """A node's wire listens before its gRPC server is up; a peer that forwards an entry in that
    moment is answered. (The nemesis restarted a node whose first forward came then: the transport
    had no nursery for it yet, and the daemon stopped on an AssertionError.)"""
    addrs = addresses()
    a, ra, b, rb = pair(tmp_path, addrs, insecure=True)
    grpc_may_start = trio.Event()
    serve_grpc_now = b._serve

    async def grpc_later(*args: Any, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await grpc_may_start.wait()
        await serve_grpc_now(*args, task_status=task_status)

    b._serve = grpc_later  # type: ignore[method-assign]

    async def answers(entry: bytes) -> int:
        return len(entry)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(b.run, rb, addrs[2], accept_forward=answers))
        await nursery.start(a.run, ra, addrs[1])
        with trio.fail_after(DEADLINE_S):
            while True:  # b's wire is up (its gRPC is not): the forward goes on the wire
                try:
                    assert await a.forward(2, b"entry", timeout_s=1) == 5
                    break
                except (WireUnavailable, ProposalTimeout, OSError):  # a's wire to b, b's to a: not yet
                    await trio.sleep(0.02)
        grpc_may_start.set()
        nursery.cancel_scope.cancel()


async def test_sent_returns_once_the_wire_sender_wrote_what_was_queued(tmp_path: Path) -> None:
    """The driver calls `sent()` before persisting on the loop (blocking it): the frames queued
    before must be in the kernel by then, not written by the sender task after the fsync."""
    addrs = addresses()
    a, ra, b, rb = pair(tmp_path, addrs, insecure=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])
        await nursery.start(a.run, ra, addrs[1])
        with trio.fail_after(DEADLINE_S):
            while a.link(2) != "wire":
                await trio.sleep(0.01)
        for i in range(20):
            before = a.stats()[2]["sent_frames"]
            a.send([heartbeat(i)])
            await a.sent()  # no other checkpoint between the send and the check
            assert a.stats()[2]["sent_frames"] == before + 1
        await rb.until(lambda: len(rb.got) == 20)
        nursery.cancel_scope.cancel()


def snap_message() -> Message:
    return Message(MessageType.SNAP, to=2, frm=1, term=3,
                   snapshot=Snapshot(SnapshotMeta(40, 3, ConfState((1, 2))), b""))


async def test_snapshot_is_streamed_in_chunks_and_staged(tmp_path: Path) -> None:
    addrs = addresses()
    a, ra, b, rb = pair(tmp_path, addrs, insecure=True)
    ra.chunks = [bytes([i]) * 100_000 for i in range(7)]
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])
        await nursery.start(a.run, ra, addrs[1])
        a.send([snap_message()])
        await ra.until(lambda: ra.snapshots)
        assert ra.snapshots == [(2, True)]
        (m,) = rb.got
        assert m.type == MessageType.SNAP and m.snapshot is not None and m.snapshot.meta.index == 40
        staged = Path(m.snapshot.data.decode())
        assert (staged / "data.mdb").read_bytes() == b"".join(ra.chunks)
        nursery.cancel_scope.cancel()


async def test_truncated_snapshot_stream_is_discarded(tmp_path: Path) -> None:
    addrs = addresses()
    _, _, b, rb = pair(tmp_path, addrs, insecure=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, rb, addrs[2])

        def send_truncated() -> grpc.StatusCode:
            frames = [encode_message(snap_message()), b"C" + b"x" * 1000]  # no end frame
            with grpc.insecure_channel(addrs[2]) as ch:
                try:
                    ch.stream_unary(f"/{SERVICE}/Snapshot")(iter(frames), timeout=5)
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        assert await trio.to_thread.run_sync(send_truncated) == grpc.StatusCode.DATA_LOSS
        assert not rb.got
        assert not list((tmp_path / "b").iterdir()), "a partial snapshot was left behind"
        nursery.cancel_scope.cancel()


def _node(ca: ClusterCA, node_id: int) -> NodeCredentials:
    key = new_node_key()
    return NodeCredentials(key, ca.issue(make_csr(key), node_id), ca.cert)


def members_over_mtls(tmp_path: Path, revoked: Revocations
                      ) -> tuple[dict[int, NodeCredentials], dict[int, str], dict[int, RaftTransport]]:
    """Nodes 1 and 2 of one cluster CA: their credentials, addresses and transports."""
    ca = ClusterCA.create(uuid.uuid4())
    creds = {i: _node(ca, i) for i in (1, 2)}
    addrs = addresses()
    ts = {
        i: RaftTransport(
            i, {3 - i: addrs[3 - i]}, staging_dir=tmp_path / str(i), limits=FAST,
            server_credentials=server_credentials(creds[i]), channel_credentials=channel_credentials(creds[i]),
            channel_options=lambda peer: channel_options(ca.cluster_id, peer),
            peer_identity=lambda ctx: authenticated_peer(ctx, ca.cert, revoked).node_id,
            wire_security=wire_security(creds[i], revoked),
        )
        for i in (1, 2)
    }
    return creds, addrs, ts


async def test_mutual_tls_between_cluster_members(tmp_path: Path) -> None:
    """Over mutual TLS, and a member's certificate cannot speak for another member."""
    revoked = Revocations()
    creds, addrs, ts = members_over_mtls(tmp_path, revoked)
    recs = {1: Recorder(), 2: Recorder()}
    async with trio.open_nursery() as nursery:
        for i in (2, 1):  # the receiver first: a sender that finds no wire tries gRPC meanwhile
            await nursery.start(ts[i].run, recs[i], addrs[i])
        with trio.fail_after(DEADLINE_S):  # the first connection may still be in its handshake
            while not recs[2].got:
                ts[1].send([heartbeat(7)])
                await trio.sleep(0.05)
        assert recs[2].got[0].index == 7 and recs[2].got[0].frm == 1
        assert ts[1].stats()[2]["legacy_frames"] == 0, "a member of this build is sent to over the wire"
        forged = Message(MessageType.HEARTBEAT, to=2, frm=3, term=3, index=8)
        with trio.fail_after(DEADLINE_S):
            while not ts[2].spoofed_messages:
                ts[1].send([forged])
                await trio.sleep(0.05)
        assert all(m.frm == 1 for m in recs[2].got)
        # Revoking node 1 cuts the connection it already has open: nothing more is delivered.
        revoked.revoke(creds[1].cert.serial_number)
        before = len(recs[2].got)
        ts[1].send([heartbeat(9)])
        with trio.fail_after(DEADLINE_S):
            while 2 not in recs[1].unreachable:
                ts[1].send([heartbeat(9)])
                await trio.sleep(0.05)
        assert len(recs[2].got) == before
        nursery.cancel_scope.cancel()


async def test_a_holder_is_asked_on_the_wire_and_an_asker_cannot_speak_for_another_member(tmp_path: Path) -> None:
    """A look or create for a directory's holder (design note 147): answered unavailable until the
    holder's file system is up, then its reply comes back; a request it cannot decode is refused in
    one line; a frame claiming another asker than its certificate ends the connection."""
    revoked = Revocations()
    _creds, addrs, ts = members_over_mtls(tmp_path, revoked)
    recs = {1: Recorder(), 2: Recorder()}

    async def serve(kind: str, request: bytes) -> bytes:
        if request == b"garbled":
            raise ValueError("no directory")
        return kind.encode() + b" " + request

    async with trio.open_nursery() as nursery:
        for i in (2, 1):
            await nursery.start(ts[i].run, recs[i], addrs[i])
        with trio.fail_after(DEADLINE_S):
            while True:  # the wire connections may still be in their handshakes
                try:
                    await ts[1].ask_holder(2, "create", b"f1", timeout_s=1)
                except WireUnavailable:
                    await trio.sleep(0.02)
                except ConnectionError as exc:
                    if "no answer" in str(exc):  # answers go on 2's connection to 1: not open yet
                        continue
                    assert "not up" in str(exc)
                    break
        ts[2].serve_holder = serve
        assert await ts[1].ask_holder(2, "look", b"f2", timeout_s=DEADLINE_S) == b"look f2"
        assert await ts[1].ask_holder(2, "create", b"f3", timeout_s=DEADLINE_S) == b"create f3"
        with pytest.raises(ConnectionError, match="malformed request: no directory"):
            await ts[1].ask_holder(2, "look", b"garbled", timeout_s=DEADLINE_S)
        ts[1]._post(ts[1]._peers[2], KIND_HOLDER + struct.pack("<QIB", 99, 3, 0) + b"f4")  # node 3's call?
        with trio.fail_after(DEADLINE_S):
            while not ts[2].rejected_frames:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


class _Reader:
    """A client-streaming servicer for the bridge: reads slowly, or stops after `stop_after`."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.got: list[bytes] = []
        self.stop_after = stop_after

    @client_stream
    async def Send(self, requests: trio.MemoryReceiveChannel[bytes], context: grpc.ServicerContext) -> bytes:
        async for item in requests:
            self.got.append(item)
            if len(self.got) % 97 == 0:
                await trio.sleep(0.01)  # a slow reader: the feeding thread must wait, in order
            if self.stop_after is not None and len(self.got) >= self.stop_after:
                return b"stopped"
        return str(len(self.got)).encode()


def _add_reader(servicer: Any, server: grpc.Server) -> None:
    handlers = {"Send": grpc.stream_unary_rpc_method_handler(servicer.Send)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Reader", handlers),))


async def test_a_member_answering_with_another_nodes_certificate_is_not_sent_to(tmp_path: Path) -> None:
    """Dialling node 2's wire must reach node 2: a listener with node 3's (valid) certificate fails
    the handshake, and the sender does not fall back to gRPC for it."""
    ca = ClusterCA.create(uuid.uuid4())
    creds = {i: _node(ca, i) for i in (1, 3)}
    revoked = Revocations()
    addrs = addresses()
    recs = {1: Recorder(), 3: Recorder()}
    impostor_addr = addrs[2]

    def transport(i: int, peers: dict[int, str]) -> RaftTransport:
        return RaftTransport(
            i, peers, staging_dir=tmp_path / str(i), limits=FAST,
            server_credentials=server_credentials(creds[i]), channel_credentials=channel_credentials(creds[i]),
            channel_options=lambda peer: channel_options(ca.cluster_id, peer),
            peer_identity=lambda ctx: authenticated_peer(ctx, ca.cert, revoked).node_id,
            wire_security=wire_security(creds[i], revoked),
        )

    sender, impostor = transport(1, {2: impostor_addr}), transport(3, {1: addrs[1]})
    async with trio.open_nursery() as nursery:
        await nursery.start(impostor.run, recs[3], impostor_addr)
        await nursery.start(sender.run, recs[1], addrs[1])
        with trio.fail_after(DEADLINE_S):
            while sender.stats()[2]["failures"] < 3:
                sender.send([heartbeat(1)])
                await trio.sleep(0.05)
        assert not recs[3].got and impostor.received_messages == 0
        assert sender.stats()[2]["legacy_frames"] == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("stop_after", [None, 5])
async def test_bridge_client_stream_keeps_order_and_survives_a_handler_that_stops(stop_after: int | None) -> None:
    reader = _Reader(stop_after)
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    items = [str(i).encode() for i in range(1500)]
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(lambda task_status: serve_grpc(
            [Binding(_add_reader, reader)], address, task_status=task_status))

        def call() -> bytes:
            with grpc.insecure_channel(bound) as channel:
                return channel.stream_unary("/test.Reader/Send")(iter(items), timeout=DEADLINE_S)

        reply = await trio.to_thread.run_sync(call)
        nursery.cancel_scope.cancel()
    if stop_after is None:
        assert reply == b"1500" and reader.got == items
    else:
        assert reply == b"stopped" and reader.got == items[:stop_after]
