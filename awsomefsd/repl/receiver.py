"""The receiving side of the link to another site (design note 48): what the link listener
(`[site] listen`, mutual TLS) does with the peer's calls.

`Cursor` says how far we applied the peer's operations; `Stage` writes a chunk of a content
version's bytes to fresh extents here (kept in memory until the push that maps them); `Push`
applies a batch of operations as `ApplyRemote` commands, slices of about SLICE_BUDGET_S each with
local work run between them, and acknowledges it (repl/link.py's
Ack: how far, and our own head). A large version changed in places comes as its changed chunks
and, in the push, the ranges it keeps from a version this site shows, whose blocks the command
shares (repl/delta.py, design note 50).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import trio
import trio.testing

from awsomefsd.crdt import ops as o
from awsomefsd.crdt import wire
from awsomefsd.crdt.hlc import EPOCH, ClockDrift, Stamp, check_drift
from awsomefsd.io.checksum import crc32c
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.errors import Delegated, FsError
from awsomefsd.meta.records import Applied, Extent
from awsomefsd.repl import delta, push_fields
from awsomefsd.repl.bases import DeltaBases
from awsomefsd.repl.endpoint import DELTA, FEATURES, INLINE_BYTES, MAX_DELEGATIONS_PER_BATCH
from awsomefsd.rpc.bridge import RpcAbort

log = logging.getLogger(__name__)

SLICE_BUDGET_S = 0.010
"""How long one slice of a push (one `ApplyRemote`) should hold the event loop: on a single node
a proposal applies there, and a local request that arrives meanwhile waits for it (a create is
five requests in a row, so it may wait for up to five slices: issue 47 asks ≤ 100 ms)."""
SLICE_OPS_FIRST = 32
"""Operations in the first slice, before any was timed."""
SLICE_OPS_MAX = 4096
"""Operations in one slice at most (a push's at most: `[site] batch_operations`)."""
PENDING_COUNT_S = 1.0
"""How stale the count of operations the peer has not applied, in a push's answer, may be."""
MAX_STAGED_BYTES = 512 << 20
"""Bytes staged and not yet pushed at most: bounds what a sender can make us hold."""
STAGED_TTL_S = 600.0
TURN_WAIT_S = 30.0
"""How long a push that continues a push still being applied here waits for it at most."""
TURN_GRACE_S = 1.0
"""How long a push that continues one not (or no longer) here waits for it: pushes are pipelined
(`[site] pushes_in_flight`) and a predecessor may arrive a little after it; one that was refused
never comes, and this one is then answered stale, the sender going on from the cursor."""


@dataclass
class _Staged:
    extents: list[Extent] = field(default_factory=list)
    held: int = 0
    """Bytes received (what MAX_STAGED_BYTES bounds)."""
    end: int = 0
    """Where the last chunk claimed ended: the next one starts there or later (a delta skips ranges)."""
    ranges: list[tuple[int, int]] = field(default_factory=list)
    """The byte ranges written to the device, in order: a push maps the version only when they
    are all of it that it does not share (`complete`)."""
    writing: int = 0
    """Chunks being written to the device now."""
    at: float = field(default_factory=time.monotonic)

    def complete(self, expected: list[tuple[int, int]]) -> bool:
        """Are the bytes staged exactly `expected` (merged byte ranges), none still being written?"""
        merged: list[tuple[int, int]] = []
        for lo, hi in self.ranges:
            if lo == hi:
                continue
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return self.writing == 0 and merged == expected


class SliceSizer:
    """How many operations the next slice takes: as many as SLICE_BUDGET_S allows at the cost per
    operation the slices before it took (`Receiver._slice_cost`: wall time on a single node,
    what a waiting request sees; the apply's own time on a cluster). A slice that
    costs more per operation shrinks the next at once; a cheaper one grows it by half the
    difference, so one quick slice (creates) does not make the next, of renames or contents,
    twice as long. A slice is one command, decided here, so every replica applies the same
    slices whatever each one's speed (the budget is the proposer's, not the state machine's)."""

    def __init__(self, budget_s: float = SLICE_BUDGET_S) -> None:
        self.budget_s = budget_s
        self.per_op_s = budget_s / SLICE_OPS_FIRST

    def size(self) -> int:
        return max(1, min(SLICE_OPS_MAX, int(self.budget_s / self.per_op_s)))

    def took(self, ops: int, seconds: float) -> None:
        """A slice of `ops` operations applied in `seconds`."""
        per_op = max(seconds, 1e-6) / max(ops, 1)
        self.per_op_s = per_op if per_op > self.per_op_s else (self.per_op_s + per_op) / 2


async def let_others_run(most_s: float = SLICE_BUDGET_S) -> None:
    """Between two slices: every other task that can run runs first (local requests, lease
    renewals, `site status`), until none can or `most_s` has passed; so a busy site still gives
    the catch-up about half of its loop, and an idle one all of it."""
    with trio.move_on_after(most_s):
        await trio.testing.wait_all_tasks_blocked()


class Receiver(DeltaBases):
    """Staging and applying what the peer sends, a job of `SiteService`."""

    _staged: dict[Stamp, _Staged]
    _apply_lock: trio.Lock
    _cursor_moved: trio.Event
    """Set (and replaced) whenever a push is done with: waiting pushes look at the cursor again."""
    _receiving: dict[int, tuple[Stamp, Stamp]]
    """The pushes being taken in now: (the stamp each continues, its last operation's)."""
    _sizer: SliceSizer | None = None
    _pending_counted: tuple[float, int] | None = None
    """When the count of operations the peer has not applied was last taken, and what it was."""
    slice_seconds: list[float] | None = None
    """When a list (tests, benchmarks): every slice's apply time is appended."""

    @property
    def sizer(self) -> SliceSizer:
        if self._sizer is None:
            self._sizer = SliceSizer()
        return self._sizer

    def cursor(self) -> Stamp | None:
        return self.meta.site_applied_from_peer()

    def features(self) -> list[str]:
        """What this site takes beyond the first protocol now: a delta's block sharing only once
        every member of the cluster decodes its command (a rolling upgrade)."""
        return [f for f in FEATURES if f != DELTA or self.meta.may_propose(c.ApplyRemoteSharing)]

    async def stage(self, header: dict[str, Any], data: memoryview) -> None:
        """Bytes of a content version, before the push that maps them: one chunk (`offset`, `crc`),
        or a delta's changed ranges together (`pieces`: [[offset, length, crc], ...], in file
        order; one round trip for them all, not one each)."""
        stamp = wire.stamp_field(header, "stamp")
        if stamp is None:
            raise wire.WireError("a chunk needs its version's stamp")
        self._refuse_clock_ahead([stamp])
        if "pieces" in header:
            pieces = push_fields.pieces(header, len(data))
        else:
            pieces = [(wire.int_field(header, "offset", limit=1 << 62), len(data),
                       wire.int_field(header, "crc", limit=1 << 32))]
        self._make_room(len(data))
        cut, at = [], 0
        for offset, length, crc in pieces:  # all checked before any is staged
            piece = data[at:at + length]
            at += length
            if offset % BLOCK_SIZE:
                raise wire.WireError(f"chunk at {offset} of version {stamp} is not block-aligned")
            if crc != crc32c(piece):
                raise wire.WireError(f"chunk at {offset} of version {stamp} arrived damaged (checksum mismatch)")
            cut.append((offset, piece))
        for i, (offset, piece) in enumerate(cut):
            await self._stage_piece(stamp, offset, piece, starts=offset == 0 or (i == 0 and header.get("first") is True))

    async def _stage_inline(self, small: list[tuple[Stamp, int, memoryview]]) -> None:
        """A push's small contents (stamp, crc, bytes), each a whole version, checked as `stage`
        checks a chunk and then staged together (`BlockStager.stage_many`): one each was a
        synchronous device write on the event loop per file, 14 % of a receiving site's time in
        a linked untar. A version staged here before (a resend) starts over."""
        if not small:
            return
        self._refuse_clock_ahead([stamp for stamp, _, _ in small])
        if len({stamp for stamp, _, _ in small}) != len(small):
            raise wire.WireError("a push carries one content version inline twice")
        self._make_room(sum(len(b) for _, _, b in small))
        for stamp, crc, piece in small:
            if crc != crc32c(piece):
                raise wire.WireError(f"the inline content of version {stamp} arrived damaged (checksum mismatch)")
        stagings = []
        for stamp, _, piece in small:
            if (before := self._staged.pop(stamp, None)) is not None:
                self.data.stager.release(before.extents, None)
            staged = self._staged[stamp] = _Staged(end=len(piece), writing=1)
            stagings.append(staged)
        try:
            extents = await self.data.stager.stage_many([(0, piece) for _, _, piece in small])
        except BaseException:  # nothing of them was staged: no push may map them
            for (stamp, _, _), staged in zip(small, stagings):
                if self._staged.get(stamp) is staged:
                    del self._staged[stamp]
            raise
        finally:
            for staged in stagings:
                staged.writing -= 1
        started_over = []
        for (stamp, _, piece), staged, mine in zip(small, stagings, extents):
            if self._staged.get(stamp) is not staged:  # a resend started over meanwhile
                self.data.stager.release(mine, None)
                started_over.append(stamp)
                continue
            staged.extents, staged.ranges, staged.held = mine, [(0, len(piece))], len(piece)
            staged.at = time.monotonic()
            self.state.received_bytes += len(piece)
        if started_over:
            raise RpcAbort(grpc.StatusCode.ABORTED, f"version {started_over[0]} was started over while it was written")

    def _make_room(self, nbytes: int) -> None:
        """Refuse `nbytes` more to stage when they would take what is staged and not pushed past
        MAX_STAGED_BYTES (what a sender can make us hold)."""
        if sum(s.held for s in self._staged.values()) + nbytes > MAX_STAGED_BYTES:
            raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many bytes staged and not pushed")

    async def _stage_piece(self, stamp: Stamp, offset: int, data: memoryview, *, starts: bool) -> None:
        """`starts`: the version's first bytes (a sender before deltas always starts at 0)."""
        staged = self._staged.get(stamp)
        if starts and staged is not None:
            self.data.stager.release(staged.extents, None)  # a resend from the start: what was staged goes
            staged = None
        if staged is None:
            if not starts:  # its start was staged here and is gone (a restart, expiry): the rest is not the version
                raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               f"chunk at {offset} of version {stamp} continues a staging this site no longer "
                               "holds (restarted, or idle too long): send the version again from its start")
            staged = self._staged[stamp] = _Staged()
        if offset < staged.end:  # a delta sends only the changed ranges, but in file order
            raise wire.WireError(f"chunk at {offset} of version {stamp}, after one that ended at {staged.end}")
        staged.end = offset + len(data)
        staged.writing += 1
        try:
            extents = await self.data.stager.stage(offset // BLOCK_SIZE, data)
        except BaseException:  # the version has a gap now: nothing of this staging may be mapped
            if self._staged.get(stamp) is staged:
                self.data.stager.release(self._staged.pop(stamp).extents, None)
            raise
        finally:
            staged.writing -= 1
        if self._staged.get(stamp) is not staged:  # a resend started over meanwhile, or a chunk failed
            self.data.stager.release(extents, None)
            raise RpcAbort(grpc.StatusCode.ABORTED, f"version {stamp} was started over while its chunk at "
                                                    f"{offset} was written")
        staged.extents += extents
        staged.ranges.append((offset, offset + len(data)))
        staged.held += len(data)
        staged.at = time.monotonic()
        self.state.received_bytes += len(data)

    async def push(self, header: dict[str, Any], data: memoryview) -> dict[str, Any]:
        """Apply a push if it continues this site's cursor, strictly in order: the sender keeps
        several in flight, and one that arrives ahead of its predecessor waits for it (`_in_turn`).
        A push that does not continue the cursor is answered `stale`, applying nothing."""
        key = object()
        kept: list[bytes] = []  # its operations, decoded once (`o.keep_decoded`) for the checks and the apply
        try:
            return await self._push(header, data, key, kept)
        finally:
            o.release_decoded(kept)
            self._receiving.pop(id(key), None)
            self._cursor_moved.set()
            self._cursor_moved = trio.Event()

    async def _in_turn(self, after: Stamp | None, key: object) -> None:
        """Until this site's cursor is at `after` or past it, or the push it continues is not
        coming: one being applied here is waited for (TURN_WAIT_S at most), one not here is given
        TURN_GRACE_S to arrive."""
        start = trio.current_time()
        want = after or EPOCH
        while (now := self.cursor() or EPOCH) < want:
            elapsed = trio.current_time() - start
            coming = any(lo <= now < hi for k, (lo, hi) in self._receiving.items() if k != id(key))
            if elapsed >= (TURN_WAIT_S if coming else TURN_GRACE_S):
                return
            moved = self._cursor_moved
            with trio.move_on_after(min(0.1, TURN_GRACE_S)):  # a slice applied moves the cursor too
                await moved.wait()

    async def _push(self, header: dict[str, Any], data: memoryview, key: object, kept: list[bytes]) -> dict[str, Any]:
        link = self.meta.site_link()
        if link is None:
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, "this site is not linked")
        after = wire.stamp_field(header, "after")
        raws = wire.hex_list(header, "ops", limit=4096)
        try:  # what it continues and where it ends, known before its contents are staged
            last = o.decode(raws[-1]).stamp if raws else after
        except o.BadOperation as exc:
            raise wire.WireError(str(exc)) from None
        self._receiving[id(key)] = (after or EPOCH, last or EPOCH)
        inline = header.get("inline", [])
        if not isinstance(inline, list) or len(inline) > len(raws):
            raise wire.WireError("a push's inline contents are not a list of its operations'")
        at, small = 0, []
        for item in inline:
            if not isinstance(item, list) or len(item) != 3:
                raise wire.WireError("an inline content is [stamp, length, crc]")
            described = {"stamp": item[0], "length": item[1], "crc": item[2]}
            stamp = wire.stamp_field(described, "stamp")
            length = wire.int_field(described, "length", limit=INLINE_BYTES + 1)
            if stamp is None or at + length > len(data):
                raise wire.WireError("an inline content needs its version's stamp, within the push's bytes")
            small.append((stamp, wire.int_field(described, "crc", limit=1 << 32), data[at:at + length]))
            at += length
        await self._stage_inline(small)
        unchanged = push_fields.unchanged_ranges(header)
        if unchanged and not self.meta.may_propose(c.ApplyRemoteSharing):
            return self._restage("a delta arrived while this cluster cannot share blocks yet (an upgrade under way)")
        contents: list[o.ContentSet] = []
        stamps: list[Stamp] = []
        yielded = time.perf_counter()
        for raw in raws:
            if time.perf_counter() - yielded > SLICE_BUDGET_S:  # decoding a push holds the loop as a slice does
                await trio.sleep(0)
                yielded = time.perf_counter()
            try:
                op = o.keep_decoded(raw)
            except o.BadOperation as exc:
                raise wire.WireError(str(exc)) from None
            kept.append(raw)
            stamps.append(op.stamp)
            if isinstance(op, o.ContentSet):
                contents.append(op)
            if isinstance(op, o.VolumeSet) and self.meta.log_level() < levels.VOLUMES_LEVEL:
                raise RpcAbort(grpc.StatusCode.UNAVAILABLE, "a volume arrived while not every member of this "
                                                            "cluster takes volumes yet (an upgrade under way)")
        if len({op.stamp for op in contents}) != len(contents):
            raise wire.WireError("a push carries one content version twice")
        self._refuse_clock_ahead(stamps)
        in_push = {wire.stamp_field({"s": item[0]}, "s") for item in inline}
        await self._in_turn(after, key)
        async with self._apply_lock:
            if after != self.cursor():
                self._drop_applied_stagings(contents)
                # `stale` tells the sender this push was not applied (an earlier send of it may
                # have been): what it just read and sent is not what this site holds.
                return {"applied": wire.stamp_text(self.cursor()), "head": wire.stamp_text(self.meta.site_head()),
                        "stale": True}
            # Only a version staged whole maps: a push of a connection that dropped, running on
            # here, may find the resend's staging half written (it would map zeros for the rest).
            for op in contents:
                staged = self._staged.get(op.stamp)
                if staged is None or staged.writing or \
                        (op.stamp not in in_push and not staged.complete(push_fields.sent_ranges(op, unchanged.get(op.stamp)))):
                    return self._restage(None)
            # The stagings are this push's from here on: a resend's first chunk, arriving while
            # the proposal below is under way, starts afresh instead of releasing its blocks.
            taken = {op.stamp: self._staged.pop(op.stamp) for op in contents}
            shared: list[Extent] = []
            shared_counts: list[int] = []
            for op in contents:
                reused = self._shareable(op, *unchanged[op.stamp]) if op.stamp in unchanged else []
                if reused is None:
                    self._release_taken(taken, None)
                    return self._restage(f"the other site sent version {op.stamp} as changes to a version this "
                                         "site no longer shows")
                shared += reused
                shared_counts.append(len(reused))
            if raws:
                refusal = await self._apply_in_slices(bytes.fromhex(link["peer"]), after, raws, stamps, contents,
                                                      taken, shared, shared_counts)
                if refusal is not None:
                    return refusal
            self.state.last_exchange_ns = time.time_ns()
            if self.state.inbound_refused:
                log.info("the other site's operations apply again (its clock is within the drift accepted)")
                self.state.inbound_refused = ""
            pending, lag_s = self.outbound_lag()
            return {"applied": wire.stamp_text(self.cursor()), "head": wire.stamp_text(self.meta.site_head()),
                    "pending": pending, "lag_ms": int(lag_s * 1000)}

    async def _apply_in_slices(self, peer: bytes, after: Stamp | None, raws: list[bytes], stamps: list[Stamp],
                               contents: list[o.ContentSet], taken: dict[Stamp, _Staged], shared: list[Extent],
                               shared_counts: list[int]) -> dict[str, Any] | None:
        """Apply a push as one `ApplyRemote` per slice, each a proposal of its own, sized to hold
        the event loop SLICE_BUDGET_S (`SliceSizer`), with every other task run between two
        (`let_others_run`): on a single node a proposal applies on the event loop, and a push of
        512 took that loop from every local request for its whole apply; slices of a fixed 128
        still held it 100-280 ms each once a catch-up's backlog made each operation dearer
        (issue 47: a catch-up must not block local requests). A slice that fails leaves the ones
        before it applied; the answer, or the next `Cursor`, tells the sender where to go on
        from (its resends start there). Returns the answer to give instead of the usual one, or
        None."""
        content_at = {op.stamp: index for index, op in enumerate(contents)}
        extent_counts = [len(taken[op.stamp].extents) for op in contents]
        done = False

        async def settle() -> None:  # acknowledged means durable: the sender forgets what we acknowledge
            if done:
                await self.meta.barrier(report=False)

        first = 0
        while first < len(raws):
            if first:
                try:
                    await let_others_run()
                except BaseException:  # cancelled: the slices not applied give their stagings back
                    self._release_taken(taken, None)
                    raise
            end = min(first + self.sizer.size(), len(raws))
            ops = [contents[content_at[stamp]] for stamp in stamps[first:end] if stamp in content_at]
            mine = {op.stamp: taken[op.stamp] for op in ops}
            extents = [ext for staged in mine.values() for ext in staged.extents]
            counts = [extent_counts[content_at[op.stamp]] for op in ops]
            at = sum(shared_counts[:content_at[ops[0].stamp]]) if ops else 0
            my_shared_counts = [shared_counts[content_at[op.stamp]] for op in ops]
            my_shared = shared[at:at + sum(my_shared_counts)]
            start = after if first == 0 else stamps[first - 1]
            command: c.ApplyRemote | c.ApplyRemoteSharing = \
                c.ApplyRemoteSharing(peer, b"" if start is None else start.pack(), tuple(raws[first:end]),
                                     tuple(extents), tuple(counts), tuple(my_shared), tuple(my_shared_counts),
                                     time.time_ns()) if my_shared \
                else c.ApplyRemote(peer, b"" if start is None else start.pack(), tuple(raws[first:end]),
                                   tuple(extents), tuple(counts), time.time_ns())
            try:
                began = time.perf_counter()
                applied = await self.ops.propose_holding(command, tries=MAX_DELEGATIONS_PER_BATCH,
                                                         inside=functools.partial(self._files_locked, ops))
                took = time.perf_counter() - began
                self.sizer.took(end - first, self._slice_cost(took, applied))
                if self.slice_seconds is not None:
                    self.slice_seconds.append(took)
            except Delegated as exc:  # refused, nothing of this slice applied: its stagings stay for the retry
                self._staged.update(taken)
                await settle()
                raise RpcAbort(grpc.StatusCode.UNAVAILABLE, f"the batch needs more of what other members "
                                                            f"hold than one push takes ({exc}): try again") from None
            except FsError as exc:
                self._release_taken(taken, exc)
                await settle()
                if exc.errno == errno.ESTALE:
                    return {"applied": wire.stamp_text(self.cursor()), "head": wire.stamp_text(self.meta.site_head()),
                            "stale": True}
                if exc.errno == errno.EAGAIN:  # a write here moved blocks offered for sharing
                    return self._restage(str(exc))
                log.error("refused a batch from the other site: %s", exc)  # what and why, in one line
                raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"refused: {exc}") from None
            except BaseException as exc:  # cancelled, say: the proposal may still commit
                self._release_taken(taken, exc)
                raise
            for op in ops:
                del taken[op.stamp]
                self._remember_received(op)
            self._took_in(command, applied)
            done = True
            first = end
        await settle()
        return None

    def _slice_cost(self, took: float, applied: Applied) -> float:
        """What a slice cost, for the next one's size: on a single node its wall time, which is how
        long it held the loop (the proposal applies there). On a cluster its wall time is mostly
        the log's round trip, a fixed cost that sizing by wall time mistook for a cost per
        operation: the slices shrank to one operation a round trip and a catch-up's backlog never
        drained (the slow tier's cluster sites). There the apply's own time is the cost: what
        holds each member's loop (a follower applies on it)."""
        return took if self.ops.coherence is None else applied.apply_s

    def _took_in(self, command: c.ApplyRemote | c.ApplyRemoteSharing, applied: Applied) -> None:
        """A slice committed: the mount's kernel caches hear of it and it counts now, not once the
        whole push is through. A cut connection cancels the push between two slices or in its
        barrier; the cursor has moved past the slices committed, so no resend brings them again,
        and told only at the end they were never told (a name stayed cached absent, a page cache
        stale) nor counted (design note 112)."""
        self.applied(command, applied)
        self.state.received_ops += len(command.operations)
        if applied.conflicts:
            self.state.conflicts_made += applied.conflicts
            log.warning("%d conflict(s) with the other site: `awsomefsd site conflicts` lists them", applied.conflicts)

    def _refuse_clock_ahead(self, stamps: Iterable[Stamp]) -> None:
        """Refuse a push or a chunk stamped further ahead of this site's clock than the hybrid
        clock accepts (crdt/hlc.py, `check_drift`; design note 48). Applied, such a stamp would
        drag this site's clock, which never goes back, as far into the future: every later
        write here would be stamped there, and the sites' last-writer-wins would follow the
        fast clock, not the order of events. Refused, nothing is applied and nothing is lost:
        the operations wait in the sender's outbox, which sends them again (the link shows
        down there, with this reason) until this clock reaches them or an operator fixes the
        other site's. Said in one line, here once per episode and in `site status`."""
        try:
            for stamp in stamps:
                check_drift(stamp, self.clock_ns())
        except ClockDrift as exc:
            at = datetime.datetime.fromtimestamp(exc.remote.wall_ns / 1e9, datetime.UTC).isoformat(timespec="seconds")
            limit = exc.max_drift_ns / 1e9
            why = (f"refusing the other site's operations: its clock is {exc.ahead_ns / 1e9:.0f} s ahead of this "
                   f"site's (operation {exc.remote} stamped {at}; at most {limit:.0f} s accepted); they wait in its "
                   "outbox until the clocks agree: check both sites' time synchronisation (NTP)")
            if not self.state.inbound_refused:
                log.error("%s", why)
            self.state.inbound_refused = why
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                           f"refused: operation {exc.remote} is stamped {at}, more than {limit:.0f} s ahead of "
                           "the receiving site's clock; it waits in the outbox until the clocks agree: check both "
                           "sites' time synchronisation (NTP)") from None

    @contextlib.asynccontextmanager
    async def _files_locked(self, contents: list[o.ContentSet]) -> AsyncIterator[None]:
        """The files whose content a batch replaces, locked as a flush locks them: a compaction
        reading a file's blocks would otherwise commit its copy of the old bytes over the new."""
        inos = sorted({ino for op in contents if (ino := self.meta.site_inode_of(op.object)) is not None})
        async with contextlib.AsyncExitStack() as stack:
            for ino in inos:  # in order: two batches never wait on each other's files
                st = await stack.enter_async_context(self.data.buffer.locked(ino))
                # what was written here first is its own version, judged against the peer's
                await self.data.commit_before_peer(st)
            yield

    def _drop_applied_stagings(self, contents: list[o.ContentSet]) -> None:
        """A stale push's stagings of versions applied already (by an earlier send) are of no use."""
        cursor = self.cursor()
        for op in contents:
            staged = self._staged.get(op.stamp)
            if cursor is not None and op.stamp <= cursor and staged is not None and not staged.writing:
                self.data.stager.release(self._staged.pop(op.stamp).extents, None)

    def _restage(self, why: str | None) -> dict[str, Any]:
        """The answer that has the sender stage the push's versions again, whole."""
        if why is not None:
            log.info("%s: asking the other site for the whole versions", why)
        return {"restage": True, "applied": wire.stamp_text(self.cursor())}

    def _release_taken(self, taken: dict[Stamp, _Staged], failure: BaseException | None) -> None:
        """Give back the blocks of stagings a push took (`failure`: the proposal that may still
        have mapped them, which withholds them instead)."""
        for staged in taken.values():
            self.data.stager.release(staged.extents, failure)
        taken.clear()

    def _shareable(self, op: o.ContentSet, base: Stamp, ranges: list[tuple[int, int, str]]) -> list[Extent] | None:
        """This site's blocks in the ranges a delta of `op` from version `base` leaves unchanged,
        or None when they cannot stand for them: the file no longer shows `base` (a write here,
        a conflict) or its blocks there are not the ones the sender's digest names."""
        found = self.meta.site_content_base(op.object)
        if found is None or found[1] != base:
            return None
        ino, _ = found
        inode = self.meta.inode(ino)
        if inode is None:
            return None
        blocks = (min(op.size, inode.size) + BLOCK_SIZE - 1) // BLOCK_SIZE  # both versions hold them
        out: list[Extent] = []
        for first, end, digest in ranges:
            if end > blocks:
                return None
            pieces = delta.clipped(self.meta.extents(ino, first, end), first, end)
            if delta.range_digest(pieces, first, end) != digest:
                return None
            out += [piece for piece in pieces if not piece.unwritten]
        return out

    async def _expire_staged(self) -> None:
        while True:
            await trio.sleep(STAGED_TTL_S / 4)
            old = [s for s, staged in self._staged.items()
                   if time.monotonic() - staged.at > STAGED_TTL_S and not staged.writing]
            for stamp in old:
                self.data.stager.release(self._staged.pop(stamp).extents, None)

    def outbound_lag(self) -> tuple[int, float]:
        """(operations the peer has not acknowledged, seconds the oldest of them has waited), for
        the answer to a push (the other site's `site status` shows them). The count is taken
        again at most every PENDING_COUNT_S: it walks the outbox up to the peer's cursor, which
        a two-sided catch-up leaves thousands long until it is forgotten, and each push's answer
        walking it held the loop as long as a slice (15 % of a catching-up receiver's time)."""
        pending = self.meta.site_outbox(self.state.peer_applied, 1)
        now = time.monotonic()
        if self._pending_counted is None or now - self._pending_counted[0] >= PENDING_COUNT_S or not pending:
            self._pending_counted = (now, self.meta.site_pending(self.state.peer_applied) if pending else 0)
        return self._pending_counted[1], (max(0, time.time_ns() - pending[0][0].wall_ns) / 1e9 if pending else 0.0)
