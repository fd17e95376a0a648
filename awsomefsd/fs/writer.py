"""Copy-on-write of byte runs: fresh extents, the data and its checksums on the device, then one
WriteData command that maps them (and supersedes what they replace).

The one exception is a block fallocate reserved (an unwritten extent) when the node is short of
space: it holds nothing anyone reads, so its first write may go in place, and a full device
cannot fail a write the reservation promised room for. A crash before the commit leaves it
unwritten, reading zeros as before. With room to spare, reserved blocks are superseded like any
others: fresh blocks side by side make one device write of a flush's scattered runs, and the
hot path never looks for reservations.

Shared by the flusher (buffered writes), the compactor (fragmented files) and nothing else: every
path that puts file data on the device ends in `write_runs` or in a truncate's tail block. The
caller holds the file's lock, so no flush, truncate or compaction of the same file interleaves.
Scattered small runs cost one allocation, a few device writes (the runs lie side by side on the
device) and one command, not one of each per run.

On a cluster member, a small flush whose mapping runs ahead of the log (a file only this node can
reach yet: an untar's, a git object's) does not write its blocks itself: they are held
(io/write_behind.py) and the pipeline writes everything held, in one go, right before the proposal
that may carry the mapping (`settle_behind`). The flush answers without a device write on its
path, and many small files' blocks go out together.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable

from awsomefsd.fs.buffer import FileState, Run
from awsomefsd.fs.reader import Reader
from awsomefsd.fs.space import SpaceGuard
from awsomefsd.io.extent_io import ExtentIO
from awsomefsd.io.fence import WriteFencedError
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError, certainly_not_applied
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, Extent

BEHIND_FILE_MAX_BYTES = 256 << 10
"""A flush run ahead with at most this much is held for the pipeline's next proposal
(write-behind, io/write_behind.py) rather than written on the request's path; a larger one makes
a device write of a useful size by itself."""

Piece = tuple[int, int, int, memoryview]  # (file block, device block, blocks, their bytes)
Segment = tuple[int, int | None, int, memoryview]  # a Piece whose device block is None until allocated


class RunWriter:
    def __init__(self, meta: MetaClient, reader: Reader, space: SpaceGuard, io: ExtentIO, *,
                 clock_ns: Callable[[], int]) -> None:
        self.meta = meta
        self.reader = reader
        self.space = space
        self.io = io
        self.clock_ns = clock_ns
        self.unsure: set[int] = set()
        """Files with a write whose commit is unknown (it may still land): their reserved blocks
        are not written in place again by this process. A late commit may map blocks written in
        place meanwhile under its own checksums, or supersede the reservation the next write
        counts on; copy-on-write is right either way."""
        self.may_run_ahead: Callable[[int], bool] = lambda _ino: False
        """`may_run_ahead(ino)`: may the file's mapping be acknowledged ahead of the log? Only for
        a file no other node can know yet (a cluster member's coherence decides:
        docs/delegations.md); elsewhere a flush waits for its mapping to commit."""

    async def write_runs(self, st: FileState, runs: list[Run], *, size: int | None = None,
                         keep_mtime: bool = False, mtime_ns: int = 0) -> None:
        """Write byte runs of one file (in offset order, disjoint) to fresh extents (or in place on
        blocks reserved for them) and commit them with one WriteData. `size` caps the file size
        the command may set (a compaction must not grow the file); `mtime_ns` is when the writes
        happened (their mtime). `keep_mtime` leaves the times alone: a compaction (`mtime_ns` 0:
        nothing changed), or data no write of which was stamped, the kernel's write-back (it
        sets the times itself): `mtime_ns` then still names a time, which tells a linked site that
        the content changed (`WriteData.changes_content`)."""
        epoch = self.meta.lease_epoch()  # the device write happens under it: mapped only under it
        inode = self.meta.inode(st.ino)
        if inode is None:
            return  # deleted meanwhile: nothing to write
        end = max(start + len(data) for start, data in runs)
        if size is not None:
            end = min(size, end)
        block_runs = await self._block_runs(st.ino, inode.size, runs)
        total = sum(len(data) for _, data in block_runs) // BLOCK_SIZE
        segments = _segments(block_runs, self._reserved(st.ino, block_runs) if self.short_of_space(total) else [])
        nblocks = sum(n for _, dev, n, _ in segments if dev is None)
        extents = await self.space.allocate(nblocks, self._hint(st.ino, block_runs[0][0])) if nblocks else []
        pieces = _lay_out(segments, extents)
        ahead = self.may_run_ahead(st.ino)
        block_runs_out = [(dev, data) for _, dev, _, data in pieces]
        held = self._write_behind(block_runs_out, epoch, nblocks == total) if ahead else None
        try:
            checksums = held if held is not None else await self.io.write_async(block_runs_out)
        except BaseException:
            self.space.release(extents)  # nothing refers to them
            raise
        records = tuple(Extent(fb, dev, n, cs) for (fb, dev, n, _), cs in zip(pieces, checksums))
        command = c.WriteData(st.ino, records, end, self.clock_ns(), touch=not keep_mtime, mtime_ns=mtime_ns)
        try:
            if ahead:
                await self.meta.run_ahead(command, epoch=epoch, still=lambda: self.may_run_ahead(st.ino))
            else:
                await self.meta.propose(command, epoch=epoch)
        except BaseException as exc:
            if held is not None and certainly_not_applied(exc):
                self.io.discard_behind(extents)  # given back below: never to be written now
            self.space.release_after_failure(extents, exc)  # a mapping that may commit keeps them
            if not certainly_not_applied(exc):
                self.unsure.add(st.ino)
            raise

    async def write_files(self, files: list[tuple[FileState, list[Run], int, int]]) -> list[BaseException | None]:
        """`write_runs` of several files at once (closed small files, fs/batch.py): one allocation,
        one device write (their blocks side by side go out as one), then one WriteData per file,
        given with its runs as (its mtime, when its last write came): stamped with the mtime (0:
        the times stay, as `keep_mtime`, and the command names the time of the change). Returns per file
        None or why its data did not commit; a failed device write fails every file. A node short
        of space writes each file with `write_runs` instead (it may write reservations in place)."""
        # state, blocks, end, touch (set the mtime), the mtime or else the time of the change (0: unknown)
        laid: list[tuple[FileState, list[tuple[int, bytearray]], int, bool, int]] = []
        outcome: list[BaseException | None] = [None] * len(files)
        index: list[int] = []
        for i, (st, runs, mtime_ns, changed_ns) in enumerate(files):
            inode = self.meta.inode(st.ino)
            if inode is None:
                continue  # deleted meanwhile: nothing to write
            try:
                block_runs = await self._block_runs(st.ino, inode.size, runs)
            except BaseException as exc:  # a partial block's old bytes could not be read
                outcome[i] = exc
                continue
            laid.append((st, block_runs, max(start + len(data) for start, data in runs),
                         bool(mtime_ns), mtime_ns or changed_ns))
            index.append(i)
        counts = [sum(len(data) for _, data in block_runs) // BLOCK_SIZE for _, block_runs, _, _, _ in laid]
        if not laid:
            return outcome
        if self.short_of_space(sum(counts)):
            for i, (st, _, _, touch, when) in zip(index, laid, strict=True):
                try:
                    await self.write_runs(st, files[i][1], mtime_ns=when or self.clock_ns(), keep_mtime=not touch)
                except BaseException as exc:
                    outcome[i] = exc
            return outcome
        epoch = self.meta.lease_epoch()
        extents = await self.space.allocate(sum(counts), self._hint(laid[0][0].ino, laid[0][1][0][0]))
        shares = _split(extents, counts)
        pieces = [_lay_out(_segments(block_runs, []), share) for (_, block_runs, _, _, _), share in zip(laid, shares, strict=True)]
        try:
            checksums = await self.io.write_async([(dev, data) for file in pieces for _, dev, _, data in file])
        except BaseException:
            self.space.release(extents)  # nothing refers to them
            raise
        sums = iter(checksums)
        for i, (st, _, end, touch, when), file, share in zip(index, laid, pieces, shares, strict=True):
            records = tuple(Extent(fb, dev, n, next(sums)) for fb, dev, n, _ in file)
            command = c.WriteData(st.ino, records, end, self.clock_ns(), touch=touch,
                                  mtime_ns=when or self.clock_ns())  # unstamped: the content changed
            try:
                await self.meta.propose(command, epoch=epoch)
            except BaseException as exc:
                self.space.release_after_failure(share, exc)
                if not certainly_not_applied(exc):
                    self.unsure.add(st.ino)
                outcome[i] = exc
        return outcome

    async def _block_runs(self, ino: int, size: int, runs: list[Run]) -> list[tuple[int, bytearray]]:
        """The runs as (first block, whole blocks): partial blocks are completed with the committed
        bytes around them, and runs that share a block become one. Completed runs are copies (the
        runs stay visible to readers as in-flight bytes at their own offsets); a run of whole
        blocks that shares none is passed as it is (a sequential writer's: no copy). In-flight
        runs are never changed, so neither is what is passed."""
        out: list[tuple[int, bytearray]] = []
        for start, data in runs:
            first, end = start // BLOCK_SIZE, start + len(data)
            end_block = -(-end // BLOCK_SIZE)
            if not (start | end) % BLOCK_SIZE and not (out and out[-1][0] + len(out[-1][1]) // BLOCK_SIZE > first):
                out.append((first, data))
                continue
            if out and out[-1][0] + len(out[-1][1]) // BLOCK_SIZE > first:
                base, buf = out[-1]  # its last block is this run's first: extend it
                grown_from = base + len(buf) // BLOCK_SIZE
            else:
                base, buf = first, bytearray()
                out.append((base, buf))
                grown_from = first
                if start % BLOCK_SIZE:
                    buf += (await self.reader.read_block(ino, first))[: start % BLOCK_SIZE]
            if end_block > grown_from:
                buf += bytes((end_block - base) * BLOCK_SIZE - len(buf))
                last = end_block - 1
                if end % BLOCK_SIZE and last * BLOCK_SIZE < size:
                    old = await self.reader.read_block(ino, last)
                    buf[end - base * BLOCK_SIZE :] = old[end % BLOCK_SIZE :]
            buf[start - base * BLOCK_SIZE : end - base * BLOCK_SIZE] = data
        return out

    def _write_behind(self, runs: list[tuple[int, memoryview]], epoch: int | None, all_fresh: bool) -> list[bytes] | None:
        """Checksums of `runs` held for the pipeline's next proposal (io/write_behind.py), or None:
        write them now. Only a mapping run ahead on a cluster member (the pipeline writes what is
        held before each proposal: `settle_behind`), of small runs all on freshly allocated
        blocks (blocks written in place may be read by another node's committed map)."""
        if epoch is None or not all_fresh or sum(len(data) for _, data in runs) > BEHIND_FILE_MAX_BYTES:
            return None
        return self.io.write_behind(runs, epoch)

    def writes_behind_at_once(self, ino: int, dirty_bytes: int) -> bool:
        """Would `write_runs` of the file's `dirty_bytes` (one flush batch) await nothing: its
        blocks held behind (`_write_behind`), no old bytes to read around them (the file is empty
        in this node's view), space in this node's groups and room in the pipeline for the
        mapping run ahead. A member's reader may then flush it inline (fs/data.py)."""
        if not 0 < dirty_bytes <= BEHIND_FILE_MAX_BYTES or self.meta.lease_epoch() is None:
            return False
        if not (self.may_run_ahead(ino) and self.meta.runs_ahead_at_once()):
            return False
        inode = self.meta.inode(ino)
        blocks = -(-dirty_bytes // BLOCK_SIZE) + 1  # an unaligned run may straddle one block more
        return (inode is not None and inode.size == 0 and self.space.fits(0)
                and self.space.allocator.free_blocks >= blocks and self.io.behind.fits(blocks * BLOCK_SIZE))

    async def settle_behind(self) -> None:
        """The pipeline's hook before each proposal (meta/ahead.py `before_propose`): write every
        held run first, so no mapping commits before its blocks are on the device. A write that
        fails fails the proposal (EIO: the batch and everything after it are lost, and reported)."""
        try:
            await self.io.settle(self.meta.lease_epoch())
        except OSError as exc:
            raise FsError(errno.EIO, f"writing file data held for this proposal failed: {exc}",
                          cause="fence" if isinstance(exc, WriteFencedError) else "") from exc

    def on_reserved(self, ino: int, start: int, end: int) -> bool:
        """Do bytes [start, end) of the file lie on blocks reserved for them (unwritten extents a
        flush will write in place)? Such a write needs no free space and no more quota."""
        if ino in self.unsure or start >= end:
            return False
        block, end_block = start // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        for ext in self.meta.extents(ino, block, end_block):
            if not ext.unwritten or ext.file_block > block:
                return False
            block = ext.end_block
        return block >= end_block

    def holds_reservations(self, ino: int) -> bool:
        """Has the file any blocks reserved for it (unwritten extents: fallocate)? A write there
        may fit on a full device (asked only near one: it walks the file's map)."""
        return any(ext.unwritten for ext in self.meta.all_extents(ino))

    def short_of_space(self, blocks: int) -> bool:
        """Should a flush of `blocks` write the reservations under it in place? Only when the
        node's space is short: otherwise fresh blocks serve better (see the module docstring)."""
        return not self.space.fits(blocks)

    def _reserved(self, ino: int, block_runs: list[tuple[int, bytearray]]) -> list[Extent]:
        """The file's unwritten extents under the runs, which they may write in place: one look at
        the map per run (never one over their whole span: a flush of scattered writes to a large
        file would read every record between them). None for a file in `unsure`."""
        if ino in self.unsure:
            return []
        return [ext for first, data in block_runs
                for ext in self.meta.extents(ino, first, first + len(data) // BLOCK_SIZE) if ext.unwritten]

    def _hint(self, ino: int, first_block: int) -> int | None:
        """Where the previous block of the file lives: allocating right after keeps files contiguous."""
        if first_block == 0:
            return None
        ext = self.meta.extent_at(ino, first_block - 1)
        return None if ext is None else ext.dev_block + (first_block - ext.file_block)


def _segments(block_runs: list[tuple[int, bytearray]], reserved: list[Extent]) -> list[Segment]:
    """The whole-block runs cut where the `reserved` (unwritten, in file order) extents begin and
    end: the parts on a reserved extent carry its device block; the others need fresh space."""
    if not reserved:
        return [(first, None, len(data) // BLOCK_SIZE, memoryview(data)) for first, data in block_runs]
    starts = [ext.file_block for ext in reserved]
    out: list[Segment] = []
    for first, data in block_runs:
        view = memoryview(data)
        total, pos = len(data) // BLOCK_SIZE, 0
        while pos < total:
            block = first + pos
            i = bisect.bisect_right(starts, block) - 1
            dev: int | None = None
            if i >= 0 and reserved[i].end_block > block:
                n = min(total - pos, reserved[i].end_block - block)
                dev = reserved[i].dev_block + block - reserved[i].file_block
            else:
                n = min(total - pos, (starts[i + 1] if i + 1 < len(starts) else block + total) - block)
            out.append((block, dev, n, view[pos * BLOCK_SIZE : (pos + n) * BLOCK_SIZE]))
            pos += n
    return out


def _split(extents: list[tuple[int, int]], counts: list[int]) -> list[list[tuple[int, int]]]:
    """Extents (device block, blocks) cut into consecutive shares of `counts` blocks each."""
    shares: list[list[tuple[int, int]]] = []
    free = iter(extents)
    dev, left = 0, 0
    for need in counts:
        share = []
        while need:
            if not left:
                dev, left = next(free)
            n = min(need, left)
            share.append((dev, n))
            dev, left, need = dev + n, left - n, need - n
        shares.append(share)
    assert next(free, None) is None and not left, "allocation and files differ in size"
    return shares


def _lay_out(segments: list[Segment], extents: list[tuple[int, int]]) -> list[Piece]:
    """Place the segments, in order, on their reserved blocks or else into the allocated device
    extents: pieces of at most one file-map record, each within one segment and one extent."""
    pieces: list[Piece] = []
    free = iter(extents)
    dev, left = 0, 0
    for first, at, total, view in segments:
        pos = 0
        while pos < total:
            if at is not None:
                n = min(total - pos, MAX_EXTENT_BLOCKS)
                pieces.append((first + pos, at + pos, n, view[pos * BLOCK_SIZE : (pos + n) * BLOCK_SIZE]))
                pos += n
                continue
            if not left:
                dev, left = next(free)
            n = min(total - pos, left, MAX_EXTENT_BLOCKS)
            pieces.append((first + pos, dev, n, view[pos * BLOCK_SIZE : (pos + n) * BLOCK_SIZE]))
            pos, dev, left = pos + n, dev + n, left - n
    assert next(free, None) is None and not left, "allocation and runs differ in size"
    return pieces
