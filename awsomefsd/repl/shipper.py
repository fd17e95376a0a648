"""The sending side of the link to another site (design note 48): the shipper reads the outbox
after the peer's cursor, sends the bytes of content versions first (only the changed ranges of a
large version the peer holds a base of: repl/bases.py, design note 50), then the operations, and
from the acknowledgements keeps the horizon (repl/link.py) up to which `ForgetSite` lets both logs
go. It never blocks a local write: it runs beside them and only reads what committed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import trio

from awsomefsd.crdt import ops as o
from awsomefsd.crdt import wire
from awsomefsd.crdt.hlc import EPOCH, Stamp
from awsomefsd.io.checksum import crc32c
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Extent
from awsomefsd.repl import delta
from awsomefsd.repl.bases import MAX_REMEMBERED_PIECES, DeltaBases
from awsomefsd.repl.endpoint import (
    CALL_TIMEOUT_S,
    DELTA,
    INLINE_BYTES,
    LINK_SERVICE,
    MAX_STAGE_PIECES,
    NOT_RUNNING_THE_LINK,
    why_failed,
)
from awsomefsd.repl.link import Ack, Horizon
from awsomefsd.rpc.bridge import unary_call

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
"""Bytes of one file per Stage call: a larger content version travels in several."""
SLOWEST_LINK_BYTES_S = 128 << 10
"""A call carrying bytes waits for them too, at this rate (1 Mbit/s): a 16 MiB chunk on a slow
link must not time out, and be sent again, forever."""
IDLE_POLL_S = 0.05
"""How often an idle shipper looks at the outbox (a read of one LMDB page) while commands apply;
with none applying, it sleeps until one does or a heartbeat is due."""
HEARTBEAT_S = 2.0
"""An idle shipper pushes an empty batch this often: the peer's acknowledgement carries its head,
which moves the horizon on, and the link's state stays current."""
FORGET_EVERY_S = 5.0
MAX_RESTAGES = 3
"""Restage answers in a row a sender takes (the peer restarted and lost what was staged) before
it calls the link broken: a peer asking for ever would otherwise stall the link without a word."""
RETRY_MIN_S, RETRY_MAX_S = 0.5, 2.0
"""Between tries to reach the peer: a link that comes back is found within RETRY_MAX_S (a try
costs a connection attempt; 10 s made every heal wait up to 10 s before the backlog moved)."""
ROLE_POLL_S = 0.2
"""How often a member looks whether it runs the link (leads its cluster) now."""


class Shipper(DeltaBases):
    """Pushing this site's operations to the peer, a job of `SiteService`."""

    pushes_in_flight: int
    """Pushes sent and not yet answered at most (`[site] pushes_in_flight`): over a WAN each push
    waits a round trip, so one at a time ships at most `batch_operations` per round trip."""
    _last_forget: float

    _peer_takes_deltas: bool
    """Did the peer's `Cursor` say it takes deltas (a build before them reads only whole versions)?"""

    async def _ship_while_running_the_link(self, link: dict[str, Any]) -> None:
        """Ship while this node runs the link (a cluster's leader); stop when it no longer does."""
        while True:
            while self.elsewhere() is not None:
                await trio.sleep(ROLE_POLL_S)
            async with trio.open_nursery() as shipping:
                shipping.start_soon(self._ship_forever, link)
                while self.elsewhere() is None:
                    await trio.sleep(ROLE_POLL_S)
                shipping.cancel_scope.cancel()
            # What the peer holds was told to this node; another may have sent since.
            self._shipped.clear()
            self.state.up, self.state.last_error = False, self.elsewhere() or ""

    async def _ship_forever(self, link: dict[str, Any]) -> None:
        """Ship to whichever of the peer's addresses runs its link (a cluster's leader), starting
        with the one that did last; a member that does not says so and the next is tried."""
        delay = RETRY_MIN_S
        peer = uuid.UUID(link["peer"])
        addresses: list[str] = list(link["addresses"])
        while True:
            elsewhere = []
            for address in list(addresses):
                try:
                    with self._channel(link, address) as channel:
                        await self._ship(channel, link, address)
                # FsError: a proposal of the shipper's own (ForgetSite, UpdateSiteLink) or the
                # barrier failed, as they may while a cluster changes leader: tried again
                except (grpc.RpcError, OSError, wire.WireError, ValueError, FsError) as exc:
                    why = why_failed(exc)
                    if NOT_RUNNING_THE_LINK in why:
                        elsewhere.append(f"{address}: {why}")
                        continue
                    if self.state.up:  # it ran the link until now: first again next time, and soon
                        addresses.remove(address)
                        addresses.insert(0, address)
                        delay = RETRY_MIN_S
                    if self.state.up or self.state.last_error != why:
                        log.warning("link to site %s at %s is down: %s", peer, address, why)
                    self.state.up, self.state.last_error = False, why
            if len(elsewhere) == len(addresses):
                why = "no node of the other site runs its link (electing a leader?): " + "; ".join(elsewhere)
                if self.state.up or self.state.last_error != why:
                    log.warning("link to site %s is down: %s", peer, why)
                self.state.up, self.state.last_error = False, why
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _ship(self, channel: grpc.Channel, link: dict[str, Any], address: str) -> None:
        """Push the outbox after the peer's cursor, up to `pushes_in_flight` pushes at a time (each
        names the one before it: the peer applies them strictly in order, and refuses one that
        does not continue its cursor), and keep the acknowledgements' figures. A failed call ends
        the connection: the next one starts from the peer's cursor again (`Cursor`)."""
        call = _caller(channel)
        header, _ = wire.unframe(await call("Cursor", wire.frame({})))
        await self._learn_peer(link, header, address)
        cursor = wire.stamp_field(header, "applied")
        features = header.get("features")
        self._peer_takes_deltas = isinstance(features, list) and DELTA in features
        horizon = Horizon()
        last_push = 0.0
        restaged = 0
        if not self.state.up:
            log.info("link to the other site is up; it applied ours up to %s", cursor)
        self.state.up, self.state.last_error = True, ""
        window: collections.deque[_Push] = collections.deque()
        looked_at = self.meta.applied_index  # at the last look at the outbox
        sent_upto = cursor  # the last operation put in a push: in flight, or acknowledged
        try:  # one failure ends the pushes in flight: it, not their group, is raised
            async with trio.open_nursery() as calls:
                while True:
                    # bytes on the way bounded too: a call's time-out counts the bytes ahead of it
                    while len(window) < self.pushes_in_flight and sum(len(p.request) for p in window) < self.batch_bytes:
                        looked_at = self.meta.applied_index
                        entries = self.meta.site_outbox(sent_upto, self.batch_operations)
                        if not entries and (window or time.monotonic() - last_push < HEARTBEAT_S):
                            break
                        ahead = sum(len(p.request) for p in window)
                        push = await self._build(_behind(call, ahead), sent_upto, entries,
                                                 {obj for p in window for obj in p.shipped})
                        window.append(push)
                        await calls.start(_send, _behind(call, ahead), push)  # issued in order before this goes on
                        sent_upto, last_push = push.last, time.monotonic()
                    if not window:  # idle: look again once a command applied (one may have filled the outbox)
                        await trio.sleep(IDLE_POLL_S)
                        with trio.move_on_after(max(0.0, last_push + HEARTBEAT_S - time.monotonic())):
                            await self.meta.applied_past(looked_at)
                        continue
                    oldest = window[0]
                    if len(window) < self.pushes_in_flight and \
                            sum(len(p.request) for p in window) < self.batch_bytes:  # room: look at the outbox soon
                        with trio.move_on_after(IDLE_POLL_S):
                            await oldest.done.wait()
                        if not oldest.done.is_set():
                            continue
                    await oldest.done.wait()
                    window.popleft()
                    if oldest.error is not None:
                        raise oldest.error  # the other calls end with the connection
                    assert oldest.reply is not None
                    await self._learn_peer(link, oldest.reply, address)
                    if oldest.reply.get("restage"):
                        self._shipped.clear()  # a delta's base may be what the peer no longer shows: all whole
                        restaged += 1
                        if restaged > MAX_RESTAGES:  # not a restart of the peer: something is wrong, say so
                            raise wire.WireError(f"the other site asked {restaged} times in a row for the bytes of "
                                                 f"operations after {oldest.after}, which were sent")
                    else:
                        restaged = 0
                        cursor = self._settle(oldest, horizon, cursor)
                        await self._forget(horizon)
                    if oldest.reply.get("restage") or oldest.reply.get("stale"):
                        # the pushes after it continue what the peer did not apply: their answers say
                        # stale (or, raced past, applied), and sending goes on from the peer's cursor
                        for later in window:
                            await later.done.wait()
                            if later.reply is not None and not later.reply.get("restage"):
                                cursor = self._settle(later, horizon, cursor)
                        window.clear()
                        self._sending.clear()
                        self._moves.clear()
                        sent_upto = cursor
                    elif not window:
                        self._sending.clear()  # nothing in flight: every version sent is settled
                        self._moves.clear()
        except BaseExceptionGroup as group:
            leaves = list(_leaves(group))
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise

    async def _build(self, call: Callable[[str, bytes], Awaitable[bytes]], after: Stamp | None,
                     entries: list[tuple[Stamp, bytes]], in_flight: set[bytes]) -> _Push:
        """The next push after `after`: the operations of `entries` up to `batch_bytes` of file
        contents, small contents inline, large ones staged at the peer first (as deltas against
        what it acknowledged, except for objects whose versions a push still in flight carries:
        the peer will show another version than the base by then). No entries: a heartbeat."""
        if entries:
            # Only what is durable ships: an operation of a batch not yet committed would be
            # lost here by a crash after the peer applied it, and our clock, restarted from
            # what was committed, would stamp new operations the peer's cursor is already past.
            await self.meta.barrier(report=False)
        ops: list[bytes] = []
        inline: list[list[Any]] = []
        unchanged: list[list[Any]] = []
        # what the peer will have: per object, the version, and its inode and the compactor's
        # copies made before its map was read (`_caught_up` when the peer acknowledges it)
        shipped: dict[bytes, tuple[Stamp, delta.ShippedVersion | None, int, int]] = {}
        data = bytearray()
        budget = self.batch_bytes
        last = after
        small: list[tuple[o.ContentSet, int]] = []  # read together once the push's operations are chosen
        for stamp, raw in entries:
            sent, ino = self.meta.site_shipping(raw)
            if ino is not None:
                op = o.decode(sent)
                assert isinstance(op, o.ContentSet)
                if ops and op.size > budget:
                    break  # the next push takes it
                if op.size <= INLINE_BYTES:  # small files travel in the push itself: no round trip each
                    small.append((op, ino))
                    shipped[op.object] = (op.stamp, None, ino, 0)
                else:
                    self._sending.add(ino)
                    since = self._moves_made
                    version, kept = await self._send_content(call, op, ino, whole=op.object in in_flight)
                    shipped[op.object] = (op.stamp, version, ino, since)
                    if kept:
                        unchanged.append(kept)
                budget -= max(op.size, 1)
            ops.append(sent)
            last = stamp
            if budget <= 0:
                break
        for (op, _ino), content in zip(small, await self._read_small_contents(small), strict=True):
            inline.append([wire.stamp_text(op.stamp), len(content), crc32c(content)])
            data += content
            self.state.pushed_bytes += len(content)
        request = wire.frame({"after": wire.stamp_text(after), "inline": inline, "unchanged": unchanged,
                              "ops": [raw.hex() for raw in ops]}, data)
        return _Push(after, last, len(ops), shipped, request)

    def _settle(self, push: _Push, horizon: Horizon, cursor: Stamp | None) -> Stamp | None:
        """Take in the peer's answer to `push` (applied or stale): its cursor, what it holds of
        our large files now, its figures. Returns the cursor (the peer's, which only moves on)."""
        reply = push.reply
        assert reply is not None
        log.debug("pushed %d operations after %s: %s", push.count, push.after, reply)
        applied, head = wire.stamp_field(reply, "applied"), wire.stamp_field(reply, "head")
        if applied is not None and (cursor is None or applied > cursor):
            if not reply.get("stale"):
                self.state.pushed_ops += push.count
            cursor = applied
        self.state.peer_applied = cursor
        for obj, (stamp, version, ino, since) in push.shipped.items():
            if reply.get("stale"):  # not applied: the peer holds what an earlier send brought, unknown here
                self._remember_shipped(obj, None)
            elif applied is not None and stamp <= applied:
                self._remember_shipped(obj, version and self._caught_up(ino, version, since))
        if "pending" in reply:
            self.state.peer_pending = wire.int_field(reply, "pending")
            self.state.peer_lag_s = wire.int_field(reply, "lag_ms") / 1000
        self.state.last_exchange_ns = time.time_ns()
        horizon.on_ack(Ack(applied or EPOCH, head or EPOCH))
        return cursor

    async def _forget(self, horizon: Horizon) -> None:
        """Let both logs go up to the stable stamp (`ForgetSite`), every FORGET_EVERY_S at most."""
        stable = horizon.advance(self.meta.site_applied_from_peer() or EPOCH, self.meta.site_head() or EPOCH)
        if stable > self.state.forgotten and time.monotonic() - self._last_forget > FORGET_EVERY_S:
            await self.meta.propose(c.ForgetSite(stable.pack(), time.time_ns()))
            self.state.forgotten, self._last_forget = stable, time.monotonic()

    async def _read_small_contents(self, small: list[tuple[o.ContentSet, int]]) -> list[bytes]:
        """The bytes of small content versions, each from its inode (the file, or its kept copy),
        read together (`Reader.read_files`); zeros for an inode gone meanwhile."""
        if not small:
            return []
        found = [(op, self.meta.inode(ino)) for op, ino in small]
        wanted = [(inode, min(op.size, self.data.effective_size(inode.ino, inode.size)))
                  for op, inode in found if inode is not None]
        read = iter(await self.data.reader.read_files(wanted))
        return [bytes(op.size) if inode is None else bytes(next(read)) for op, inode in found]

    async def _send_content(self, call: Callable[[str, bytes], Awaitable[bytes]], op: o.ContentSet,
                            ino: int, *, whole: bool) -> tuple[delta.ShippedVersion | None, list[Any] | None]:
        """Stage a large content version's bytes at the peer, chunk by chunk, from the committed
        blocks: only those changed since the version of the file the peer was last sent and
        acknowledged, if it still shows that one (design note 50). Returns what the peer will
        have of the file (None: a copy kept in /.conflicts, which the peer keeps apart too, or
        more pieces than are worth remembering) and the push's `unchanged` entry (None:
        everything was sent). `whole`: send it all, no delta."""
        nblocks = (op.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        found = self.meta.site_content_base(op.object)
        from_copy = found is None or found[0] != ino  # a version kept in /.conflicts: the peer keeps it apart
        base = None if from_copy or whole or not self._peer_takes_deltas else self._shipped.get(op.object)
        with self.data.reader.holding_map():
            now = self.meta.extents(ino, 0, nblocks)
        kept = [] if base is None else delta.unchanged_ranges(base.extents, now, min(base.size, op.size) // BLOCK_SIZE)
        if len(kept) > delta.MAX_SHARED_RANGES:
            kept = []
        pieces = [piece for lo, hi in kept for piece in delta.clipped(now, lo, hi) if not piece.unwritten]
        batch: list[tuple[int, bytes]] = []  # a delta's changed ranges go together, a round trip for many
        batched = 0  # their bytes
        first = True

        async def stage() -> None:
            nonlocal first, batched
            if not batch:
                return
            if self._peer_takes_deltas:
                header: dict[str, Any] = {"stamp": wire.stamp_text(op.stamp), "first": first,
                                          "pieces": [[at, len(b), crc32c(b)] for at, b in batch]}
            else:  # the first protocol: one chunk a call
                (at, b), = batch
                header = {"stamp": wire.stamp_text(op.stamp), "offset": at, "crc": crc32c(b)}
            await call("Stage", wire.frame(header, b"".join(b for _, b in batch)))
            self.state.pushed_bytes += batched
            batch.clear()
            batched, first = 0, False

        for lo, hi in delta.complement(kept, nblocks) or [(0, 0)]:
            for chunk_lo in range(lo, max(hi, lo + 1), CHUNK_BYTES // BLOCK_SIZE):
                chunk_hi = min(hi, chunk_lo + CHUNK_BYTES // BLOCK_SIZE)
                chunk, read = await self._read_committed(ino, chunk_lo, chunk_hi, op.size)
                pieces += read
                if batch and (not self._peer_takes_deltas or len(batch) >= MAX_STAGE_PIECES
                              or batched + len(chunk) > CHUNK_BYTES):
                    await stage()
                batch.append((chunk_lo * BLOCK_SIZE, chunk))
                batched += len(chunk)
        await stage()
        version = None if from_copy or len(pieces) > MAX_REMEMBERED_PIECES else \
            delta.ShippedVersion(op.stamp, op.size, tuple(sorted(pieces, key=lambda piece: piece.file_block)))
        if not kept or base is None:
            return version, None
        self.state.unchanged_bytes += sum(min(hi * BLOCK_SIZE, op.size) - lo * BLOCK_SIZE for lo, hi in kept)
        return version, [wire.stamp_text(op.stamp), wire.stamp_text(base.stamp),
                         [[lo, hi, delta.range_digest(now, lo, hi)] for lo, hi in kept]]

    async def _read_committed(self, ino: int, first: int, end: int, size: int) -> tuple[bytes, list[Extent]]:
        """The committed bytes of file blocks [first, end), cut at `size` (zeros for holes), and
        the map's records they came from: what the peer will have there, exactly (the reader's
        view would add bytes buffered here and not yet committed)."""
        lo, hi = first * BLOCK_SIZE, min(end * BLOCK_SIZE, size)
        out = bytearray(max(0, hi - lo))
        with self.data.reader.holding_map():
            pieces = [p for p in delta.clipped(self.meta.extents(ino, first, end), first, end) if not p.unwritten]
            for piece in pieces:
                a, b = piece.file_block * BLOCK_SIZE, min(piece.end_block * BLOCK_SIZE, hi)
                if a < b:
                    out[a - lo:b - lo] = await self.data.reader.read_extent(piece, piece.file_block, piece.end_block,
                                                                            a, b)
        return bytes(out), pieces


@dataclasses.dataclass
class _Push:
    """A push sent and not yet taken in: what it carries, and the peer's answer once it came."""

    after: Stamp | None
    """The operation before its first (the peer's cursor it continues)."""
    last: Stamp | None
    """Its last operation: the peer's cursor once it applied it (`after` for a heartbeat)."""
    count: int
    shipped: dict[bytes, tuple[Stamp, delta.ShippedVersion | None, int, int]]
    request: bytes
    reply: dict[str, Any] | None = None
    error: Exception | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


async def _send(call: Callable[[str, bytes], Awaitable[bytes]], push: _Push,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Send `push` and keep the answer, or the error, for the shipper to take in, in order. The
    call is issued before this task first yields, so `nursery.start` returns once it is on its
    way: pushes leave in the order they were built."""
    task_status.started()
    try:
        push.reply, _ = wire.unframe(await call("Push", push.request))
    except Exception as exc:  # the shipper raises it when it comes to this push
        push.error = exc
    finally:
        push.done.set()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _caller(channel: grpc.Channel) -> Callable[..., Awaitable[bytes]]:
    """`call(method, request, ahead=0)`: `ahead`, bytes of calls on the way before it, which it
    waits behind on a slow link (its time-out counts them)."""
    async def call(method: str, request: bytes, ahead: int = 0) -> bytes:
        return await unary_call(channel, f"/{LINK_SERVICE}/{method}", request,
                                CALL_TIMEOUT_S + (len(request) + ahead) / SLOWEST_LINK_BYTES_S)
    return call


def _behind(call: Callable[..., Awaitable[bytes]], ahead: int) -> Callable[[str, bytes], Awaitable[bytes]]:
    """`call` for requests sent while `ahead` bytes of pushes are on the way before them."""
    async def later(method: str, request: bytes) -> bytes:
        return await call(method, request, ahead)
    return later
