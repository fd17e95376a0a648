"""The requests a cluster member's reader answers itself (`inline.INLINE_MEMBER`,
`INLINE_MEMBER_CACHING`, `KernelHandlers.member_quick`): the reader must stay free to read (the
invalidator's notifications may wait for a request it has still to read), so such a request may
wait for nothing, and it must not need the member's coherence (a delegation may wait for another
node). Each handler of the set runs here in an already cancelled scope, over a core whose
coherence fails whenever it is asked anything but what never waits: any wait, or any other
question to it, fails the test. The changes a member serves inline only while it holds the
delegation or lease they need run the same way over a real `ClusterCoherence` that holds them."""

from __future__ import annotations

import os
import stat
from typing import Any

import trio

from awsomefsd.cluster.coherence import ClusterCoherence
from awsomefsd.daemon.node import Core
from awsomefsd.fuse.invalidate import Invalidator, Target
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Body, Fattr, Header, Op
from awsomefsd.fuse.kernel.handlers import KernelHandlers
from awsomefsd.fuse.kernel.inline import INLINE_MEMBER, INLINE_MEMBER_CACHING
from awsomefsd.meta import ahead as ahead_mod
from awsomefsd.meta.commands import RENAME_NOREPLACE, RENAME_WHITEOUT
from awsomefsd.meta.records import ROOT_INO
from tests.support.no_kernel import NoKernel


class AskedCoherence:
    """A member's coherence that must not be asked anything by an inline request but the
    things that never wait: whether the node is strict (it is not), to queue the release of an
    orphan for the orphan task, and that the kernel read a directory's listing (a set's add)."""

    name_timeout_s = None
    strict = False

    def __init__(self) -> None:
        self.orphans_released: list[int] = []
        self.listings: list[int] = []

    def release_orphan(self, ino: int) -> None:
        self.orphans_released.append(ino)

    def listed(self, ino: int) -> None:
        self.listings.append(ino)

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"an inline request asked the coherence for {name!r}")


def request(opcode: int, nodeid: int, body: bytes) -> tuple[Header, Body]:
    raw = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, 1, nodeid, 0, 0, 0, 0, 0) + body
    return Header(*abi.IN_HEADER.unpack_from(raw)), Body(raw)


async def answered_without_waiting(handler: Any, opcode: int, nodeid: int, body: bytes) -> Any:
    """The handler's answer, run in an already cancelled scope: any checkpoint inside it raises
    Cancelled, which the scope swallows before the handler finished."""
    answered: Any = None
    finished = False
    with trio.CancelScope() as scope:
        scope.cancel()
        answered = await handler(*request(opcode, nodeid, body))
        finished = True
    assert finished, f"{abi.OP_NAMES[opcode]} waited for something"
    return answered


async def test_every_request_a_member_serves_inline_waits_for_nothing_and_asks_no_other_node(core: Core) -> None:
    fh, inode = await core.ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    await core.ops.setxattr(inode.ino, b"user.k", b"v", 0)
    link = await core.ops.symlink(ROOT_INO, b"l", b"f", 0, 0)
    listing = await core.ops.opendir(ROOT_INO)
    # an orphan still open, with two kernel references: its release and forgets queue its release
    orphan_fh, orphan = await core.ops.create(ROOT_INO, b"gone", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    core.ops.remember(orphan.ino)
    core.ops.remember(orphan.ino)
    await core.ops.unlink(ROOT_INO, b"gone", is_dir=False)
    read_in = abi.READ_IN.pack(listing, 0, 4096, 0, 0, 0, 0)
    bodies = {
        Op.GETXATTR: (inode.ino, abi.GETXATTR_IN.pack(64, 0) + b"user.k\0"),
        Op.LISTXATTR: (inode.ino, abi.GETXATTR_IN.pack(64, 0)),
        Op.READLINK: (link.ino, b""),
        Op.STATFS: (ROOT_INO, b""),
        Op.GETATTR: (inode.ino, b""),
        Op.READDIR: (ROOT_INO, read_in),
        Op.READDIRPLUS: (ROOT_INO, read_in),
        Op.RELEASEDIR: (ROOT_INO, abi.RELEASE_IN.pack(listing, 0, 0, 0)),
        Op.RELEASE: (orphan.ino, abi.RELEASE_IN.pack(orphan_fh, 0, 0, 0)),
        Op.FORGET: (orphan.ino, abi.U64.pack(1)),
        Op.BATCH_FORGET: (0, abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(orphan.ino, 1)),
    }
    assert set(bodies) == set(INLINE_MEMBER_CACHING), "a request added to the set needs its case here"
    assert {Op.GETATTR} == INLINE_MEMBER_CACHING - INLINE_MEMBER, "only a strict member's getattr catches up"
    handlers = KernelHandlers(core.ops)
    coherence = AskedCoherence()
    core.ops.coherence = coherence  # type: ignore[assignment]
    try:
        for opcode, (nodeid, body) in bodies.items():
            await answered_without_waiting(handlers.table[opcode], opcode, nodeid, body)
        assert coherence.orphans_released == [orphan.ino, orphan.ino], "the release and the last forget"
        assert not core.ops.handles.is_open(orphan.ino) and core.ops.handles.find(listing) is None
    finally:
        core.ops.coherence = None
    await core.ops.release(fh)


async def test_a_members_flush_is_answered_inline_only_with_nothing_buffered(core: Core) -> None:
    """`KernelHandlers.member_quick`: FLUSH alone, and only for a file with nothing buffered (a
    flush of buffered data writes it to the device and maps it first)."""
    written_fh, _ = await core.ops.create(ROOT_INO, b"written", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    await core.ops.write(written_fh, 0, b"buffered")
    empty_fh, _ = await core.ops.create(ROOT_INO, b"empty", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    handlers = KernelHandlers(core.ops)
    quick = handlers.member_quick[Op.FLUSH]

    def flush_of(fh: int) -> bytes:
        body = abi.FLUSH_IN.pack(fh, 0, 0, 0)
        return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), Op.FLUSH, 1, 0, 0, 0, 0, 0, 0) + body

    core.ops.coherence = AskedCoherence()  # type: ignore[assignment]
    try:
        assert not quick(flush_of(written_fh)), "buffered data: its flush gets a task"
        assert not quick(flush_of(12345)), "an unknown handle: its error comes from a task"
        assert quick(flush_of(empty_fh))
        await answered_without_waiting(handlers.table[Op.FLUSH], Op.FLUSH, 0, abi.FLUSH_IN.pack(empty_fh, 0, 0, 0))
    finally:
        core.ops.coherence = None
    for fh in (written_fh, empty_fh):
        await core.ops.flush(fh)
        await core.ops.release(fh)


def raw_request(opcode: int, nodeid: int, body: bytes) -> bytes:
    return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, 1, nodeid, 0, 0, 0, 0, 0) + body


async def test_a_members_changes_in_what_it_holds_are_answered_inline_without_waiting(
        core: Core, monkeypatch: Any) -> None:
    """`KernelHandlers.member_quick` beyond FLUSH: a look, a create (file, node, directory,
    symlink), an unlink and a rename in directories whose delegations this node holds, an OPENDIR
    of such a directory, a write, an attribute change and an OPEN of a file whose write lease it
    holds (the OPEN with its liveness lease valid and no kernel invalidation pending, else it
    would wait for the invalidator, whose notifications may wait for a request the reader has
    still to read; nor with O_TRUNC). Quick only then, and then answered
    with no wait at all (a real `ClusterCoherence`, so entering its delegations and leases is
    what runs); not quick in a directory or file it does not hold, during a hand-over, in strict
    mode, with the pipeline full (a look excepted: it only reads), for a create with no inode number left, for a time set over
    buffered bytes (a flush first), nor for a rename that moves a directory to another parent or
    leaves a whiteout (both go through the log)."""
    ops = core.ops
    held_dir = (await ops.mknod(ROOT_INO, b"held", stat.S_IFDIR | 0o755, 0, 0, 0)).ino
    other_dir = (await ops.mknod(ROOT_INO, b"other", stat.S_IFDIR | 0o755, 0, 0, 0)).ino
    second_dir = (await ops.mknod(ROOT_INO, b"second", stat.S_IFDIR | 0o755, 0, 0, 0)).ino
    fh, held_file = await ops.create(held_dir, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    other_fh, other_file = await ops.create(other_dir, b"g", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    other_fh_ino = other_file.ino
    await ops.mknod(held_dir, b"gone", stat.S_IFREG | 0o644, 0, 0, 0)
    await ops.new_ino()  # a reservation of inode numbers to create from
    invalidator = Invalidator(kernel=NoKernel())
    lease = {"valid": True}
    coherence = ClusterCoherence(1, core.meta, invalidator, lambda: 1,  # type: ignore[arg-type]
                                 lease_valid=lambda: lease["valid"])
    coherence.held.update({held_dir, second_dir, held_file.ino})
    handlers = KernelHandlers(ops)
    quick = handlers.member_quick
    chmod = abi.SETATTR_IN.pack(Fattr.MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFREG | 0o600, 0, 0, 0, 0)
    data = b"x" * 100
    in_held = {
        Op.LOOKUP: (held_dir, b"f\0"),
        Op.CREATE: (held_dir, abi.CREATE_IN.pack(os.O_RDWR, stat.S_IFREG | 0o644, 0o022, 0) + b"c\0"),
        Op.MKNOD: (held_dir, abi.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0o022, 0) + b"p\0"),
        Op.MKDIR: (held_dir, abi.MKDIR_IN.pack(0o755, 0o022) + b"sub\0"),
        Op.SYMLINK: (held_dir, b"l\0f\0"),
        Op.UNLINK: (held_dir, b"gone\0"),
        Op.WRITE: (held_file.ino, abi.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0) + data),
        Op.SETATTR: (held_file.ino, chmod),
        Op.RENAME: (held_dir, abi.U64.pack(second_dir) + b"f\0moved\0"),
        Op.RENAME2: (held_dir, abi.RENAME2_IN.pack(held_dir, RENAME_NOREPLACE, 0) + b"c\0c2\0"),
        Op.OPEN: (held_file.ino, abi.OPEN_IN.pack(os.O_RDONLY, 0)),
        Op.OPENDIR: (held_dir, abi.OPEN_IN.pack(os.O_RDONLY, 0)),
    }
    not_held = {
        Op.OPEN: (other_fh_ino, abi.OPEN_IN.pack(os.O_RDONLY, 0)), Op.OPENDIR: (other_dir, abi.OPEN_IN.pack(os.O_RDONLY, 0)),
        Op.LOOKUP: (other_dir, b"g\0"), Op.CREATE: (other_dir, in_held[Op.CREATE][1]),
        Op.MKDIR: (other_dir, in_held[Op.MKDIR][1]), Op.UNLINK: (other_dir, b"g\0"),
        Op.WRITE: (0, abi.WRITE_IN.pack(other_fh, 0, len(data), 0, 0, 0, 0) + data),
        Op.RENAME: (held_dir, abi.U64.pack(other_dir) + b"f\0f\0"),
        Op.RENAME2: (held_dir, abi.RENAME2_IN.pack(second_dir, 0, 0) + b"sub\0sub\0"),  # after MKDIR: a directory moving
    }
    whiteout = abi.RENAME2_IN.pack(held_dir, RENAME_WHITEOUT, 0) + b"f\0w\0"
    assert set(quick) == set(in_held) | {Op.FLUSH}, "a request added to the set needs its case here"
    ops.coherence = coherence
    try:
        for opcode, (nodeid, body) in not_held.items():
            if opcode != Op.RENAME2:
                assert not quick[opcode](raw_request(opcode, nodeid, body)), f"{abi.OP_NAMES[opcode]} outside what is held"
        assert not quick[Op.RENAME2](raw_request(Op.RENAME2, held_dir, whiteout)), "a whiteout's inode is the log's"
        truncating = abi.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC, 0)
        assert not quick[Op.OPEN](raw_request(Op.OPEN, held_file.ino, truncating)), "O_TRUNC truncates"
        lease["valid"] = False
        assert not quick[Op.OPEN](raw_request(Op.OPEN, *in_held[Op.OPEN])), "an expired node catches up first"
        lease["valid"] = True
        behind = Invalidator(kernel=NoKernel())
        behind.submit([Target.inode(held_file.ino)])
        coherence.invalidator = behind
        assert not quick[Op.OPEN](raw_request(Op.OPEN, *in_held[Op.OPEN])), "an invalidation to send first"
        coherence.invalidator = invalidator
        coherence.strict = True
        assert not any(quick[op](raw_request(op, *in_held[op])) for op in in_held), "strict mode: nothing runs ahead"
        coherence.strict = False
        coherence._releasing.add(held_dir)
        assert not quick[Op.CREATE](raw_request(Op.CREATE, *in_held[Op.CREATE])), "a hand-over has begun"
        assert not quick[Op.LOOKUP](raw_request(Op.LOOKUP, *in_held[Op.LOOKUP])), "a look waits for the hand-over"
        coherence._releasing.discard(held_dir)
        monkeypatch.setattr(ahead_mod, "MAX_QUEUED", core.meta.ahead.pending)
        assert not quick[Op.UNLINK](raw_request(Op.UNLINK, *in_held[Op.UNLINK])), "no room in the pipeline"
        assert quick[Op.LOOKUP](raw_request(Op.LOOKUP, *in_held[Op.LOOKUP])), "a look needs no room in the pipeline"
        monkeypatch.undo()
        monkeypatch.setattr(ops.numbers, "at_once", lambda: False)
        assert not quick[Op.MKDIR](raw_request(Op.MKDIR, *in_held[Op.MKDIR])), "no inode number left to create"
        assert quick[Op.LOOKUP](raw_request(Op.LOOKUP, *in_held[Op.LOOKUP])), "a look needs no inode number"
        monkeypatch.undo()
        for opcode, (nodeid, body) in in_held.items():
            assert quick[opcode](raw_request(opcode, nodeid, body)), abi.OP_NAMES[opcode]
            await answered_without_waiting(handlers.table[opcode], opcode, nodeid, body)
        assert not quick[Op.RENAME2](raw_request(Op.RENAME2, held_dir, not_held[Op.RENAME2][1])), \
            "a directory moving to another parent"
        assert core.meta.lookup(held_dir, b"gone") is None and core.meta.lookup(held_dir, b"sub") is not None
        assert core.meta.lookup(second_dir, b"moved") == held_file.ino and core.meta.lookup(held_dir, b"c2")
        assert ops.inode(held_file.ino).mode & 0o777 == 0o600
        stamp = abi.SETATTR_IN.pack(Fattr.MTIME, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        assert not quick[Op.SETATTR](raw_request(Op.SETATTR, held_file.ino, stamp)), "a time over buffered bytes"
    finally:
        ops.coherence = None
    for handle in (fh, other_fh):
        await ops.flush(handle)
        await ops.release(handle)


async def test_a_members_flush_of_a_small_fresh_file_is_answered_inline_its_blocks_held_behind(
        core: Core, monkeypatch: Any) -> None:
    """A close (FLUSH) or a futimens (SETATTR) over a small fresh file's buffered bytes is quick on
    a member, and answered with no wait at all: the blocks are held for the pipeline's next
    proposal (io/write_behind.py), the mapping runs ahead. The file reads back as written while
    its blocks are held, and from the device once the pipeline proposed. Not quick for a file
    that may not run ahead, one too large to hold, one whose flush must read a block it mapped
    before, one whose flush is under way, or with the pipeline full."""
    ops, data = core.ops, core.data
    held_dir = (await ops.mknod(ROOT_INO, b"held", stat.S_IFDIR | 0o755, 0, 0, 0)).ino
    small = os.urandom(5000)
    files = {}
    for name, size in ((b"closed", len(small)), (b"stamped", len(small)), (b"big", 300 << 10), (b"stale", 10)):
        fh, inode = await ops.create(held_dir, name, stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
        await ops.write(fh, 0, small if size == len(small) else os.urandom(size))
        files[name] = (fh, inode.ino)
    grown_fh, grown = await ops.create(held_dir, b"grown", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    await ops.write(grown_fh, 0, small)
    await data.flush(grown.ino)  # mapped: its last block is partly written
    await ops.write(grown_fh, len(small), b"more")
    fresh = {ino for name, (_, ino) in files.items() if name != b"stale"} | {grown.ino}
    monkeypatch.setattr(data.writer, "may_run_ahead", lambda ino: ino in fresh)
    monkeypatch.setattr(core.meta, "lease_epoch", lambda: 1)
    core.meta.ahead.before_propose = data.writer.settle_behind
    coherence = ClusterCoherence(1, core.meta, Invalidator(kernel=NoKernel()), lambda: 1,  # type: ignore[arg-type]
                                 lease_valid=lambda: True)
    coherence.held.update({held_dir, *fresh, files[b"stale"][1]})
    handlers = KernelHandlers(ops)
    quick = handlers.member_quick
    closed_fh, closed = files[b"closed"]
    stamp = abi.SETATTR_IN.pack(Fattr.MTIME, 0, 0, 0, 0, 0, 1_600_000_000, 0, 0, 7, 0, 0, 0, 0, 0, 0)
    ops.coherence = coherence
    try:
        assert not quick[Op.FLUSH](raw_request(Op.FLUSH, closed, abi.FLUSH_IN.pack(files[b"big"][0], 0, 0, 0))), \
            "too large to hold: it writes its own blocks"
        assert not quick[Op.FLUSH](raw_request(Op.FLUSH, 0, abi.FLUSH_IN.pack(files[b"stale"][0], 0, 0, 0))), \
            "a file that may not run ahead waits for its mapping to commit"
        assert not quick[Op.FLUSH](raw_request(Op.FLUSH, 0, abi.FLUSH_IN.pack(grown_fh, 0, 0, 0))), \
            "its mapped tail block is to be read first"
        st = data.buffer.files[closed]
        st.lock.acquire_nowait()
        assert not quick[Op.FLUSH](raw_request(Op.FLUSH, closed, abi.FLUSH_IN.pack(closed_fh, 0, 0, 0))), "a flush under way"
        st.lock.release()
        monkeypatch.setattr(ahead_mod, "MAX_QUEUED", core.meta.ahead.pending)
        assert not quick[Op.FLUSH](raw_request(Op.FLUSH, closed, abi.FLUSH_IN.pack(closed_fh, 0, 0, 0))), "no room"
        monkeypatch.setattr(ahead_mod, "MAX_QUEUED", 8192)
        assert quick[Op.FLUSH](raw_request(Op.FLUSH, closed, abi.FLUSH_IN.pack(closed_fh, 0, 0, 0)))
        await answered_without_waiting(handlers.table[Op.FLUSH], Op.FLUSH, closed, abi.FLUSH_IN.pack(closed_fh, 0, 0, 0))
        stamped = files[b"stamped"][1]
        assert quick[Op.SETATTR](raw_request(Op.SETATTR, stamped, stamp)), "a time over a small fresh file's bytes"
        await answered_without_waiting(handlers.table[Op.SETATTR], Op.SETATTR, stamped, stamp)
    finally:
        ops.coherence = None
    assert not data.has_buffered(closed) and len(data.writer.io.behind.runs) == 2, "both flushed, blocks held"
    assert ops.inode(stamped).mtime_ns == 1_600_000_000_000_000_007
    for ino in (closed, stamped):
        assert await data.reader.read(ops.inode(ino), 0, 8192) == small, "held blocks read as written"
    async with trio.open_nursery() as nursery:
        await nursery.start(core.meta.run_pipeline)
        await core.meta.barrier()
        nursery.cancel_scope.cancel()
    assert not data.writer.io.behind, "the pipeline wrote them before it proposed"
    for ino in (closed, stamped):
        [extent] = core.meta.extents(ino, 0, 2)
        assert await data.writer.io.read(extent.dev_block, extent.checksums, 0, len(small)) == small


def file_created_ahead(core: Core, lease: dict[str, bool]) -> tuple[ClusterCoherence, int]:
    """A member's coherence whose liveness lease is `lease["valid"]`, and a file it created ahead
    in a directory it holds (fresh while the lease is valid)."""
    coherence = ClusterCoherence(1, core.meta, Invalidator(kernel=NoKernel()), lambda: 1,  # type: ignore[arg-type]
                                 lease_valid=lambda: lease["valid"])
    directory, ino = 1000, 1001
    coherence.held.add(directory)
    coherence.created_ahead(ino, directory, is_dir=False)
    return coherence, ino


async def test_a_file_is_fresh_only_while_this_nodes_liveness_lease_is_valid(core: Core) -> None:
    """`fresh` lets a file's flush be acknowledged ahead of the log. A node paused past its
    liveness lease (SIGSTOP, a stalled VM) may have been expired meanwhile and the directory given
    to another node: until it renews (after applying that expiry), nothing is fresh, so its close
    waits for the log, which refuses the stale write (EIO), instead of answering it ahead.
    (tests/cluster/test_cluster_faults.py::test_stale_writer_after_sigstop_gets_eio, with
    delegations kept while their files are fresh, failed 2 of 3 runs without this.)"""
    lease = {"valid": True}
    coherence, ino = file_created_ahead(core, lease)
    assert coherence.fresh(ino)
    lease["valid"] = False
    assert not coherence.fresh(ino), "fresh with the liveness lease lapsed"
    assert coherence.only_here(ino), "still reachable only here: another node's look must end it"
    lease["valid"] = True
    assert coherence.fresh(ino)
    lease["valid"] = False
    coherence.published(ino)  # another node looked it up meanwhile
    lease["valid"] = True
    assert not coherence.fresh(ino), "fresh again after another node reached it while the lease was lapsed"


async def test_another_nodes_look_ends_freshness_even_while_the_lease_is_lapsed(core: Core) -> None:
    """A look another member sends here (`_reached_by_another`, design note 148) publishes a file
    created ahead here whether or not this node's liveness lease is valid at that moment: were
    it skipped while the lease was lapsed, the file would be fresh again after the renewal, and its
    unlink (UnlinkAlone) or its mappings would run ahead while the other node holds it."""
    lease = {"valid": False}
    coherence, ino = file_created_ahead(core, lease)
    core.ops.coherence = coherence
    try:
        await core.ops._reached_by_another(ino)
    finally:
        core.ops.coherence = None
    lease["valid"] = True
    assert not coherence.only_here(ino) and not coherence.fresh(ino), "fresh again after another node's look"
