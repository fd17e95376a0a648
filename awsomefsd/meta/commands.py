"""Metadata commands: the only way the namespace changes.

A command is built by the proposer with everything non-deterministic already fixed — inode
numbers, timestamps, device extents — so every replica that applies the same command to the same
state reaches the same state. The state machine validates each command against the state it finds
(the proposer's view may be stale) and either applies all of it or none of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from awsomefsd.meta.levels import BASE_LOG_LEVEL
from awsomefsd.meta.records import Applied, Extent, Inode

R = TypeVar("R")
"""What applying a command returns (`Command[R]`)."""


class Command(Generic[R]):
    """A metadata command whose apply returns an `R`: `MetaClient.propose(Mknod(...))` is an Inode
    to mypy, so every call site's use of the result is checked, and the state machine's handler
    table (`StateMachine._on`) is checked to return what each command declares."""

    __slots__ = ()

DELEGATED_COOKIE_BIT = 1 << 62
"""Cookies chosen by proposers have this bit set; the log's cookie counter never reaches it."""


def delegated_cookie(reserved: int) -> int:
    """The readdir cookie a proposer uses for a number from its ReserveInodes range."""
    return DELEGATED_COOKIE_BIT | reserved


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
"""Rename's `flags` (the values of renameat2(2))."""


@dataclass(frozen=True, slots=True)
class Mknod(Command[Inode]):
    """Create a file, directory, symlink, fifo, socket or device node (`mode` carries the type).

    `cookie`: a node that changes a directory ahead of the log (docs/delegations.md) predicts the
    entry's readdir cookie, so it chooses it: from its reserved inode numbers (`delegated_cookie`),
    a range no other proposer and no counter ever hands out. `lease_to`: such a node also takes the
    new file's write lease, or the new directory's delegation, in the same command (nobody else
    can know it yet)."""

    parent: int
    name: bytes
    ino: int
    mode: int
    uid: int
    gid: int
    now_ns: int
    rdev: int = 0
    target: bytes = b""  # symlinks only
    cookie: int = 0  # the entry's readdir cookie when the proposer chose it (delegations); 0: the log's next
    lease_to: int = 0  # a file's write lease (a directory's delegation) goes to this node with the create


@dataclass(frozen=True, slots=True)
class MknodFor(Mknod):
    """A create the directory's holder runs for another member that asked it to (design note 145:
    a create in a directory another node holds goes to that node, instead of the delegation
    coming to the creator). `ino` is from the requester's reserved numbers, so a requester that
    lost the answer knows the file as its own; `lease_to` is the requester, whose write lease on
    the new file needs its liveness lease still current (`lease_epoch`): it may have expired while
    the command was on its way, and a lease granted to an expired member would stay held by no
    one able to hand it over. Then the file is made without a lease holder. A Mknod to every
    observer that knows Mknod only."""

    lease_epoch: int = 0


@dataclass(frozen=True, slots=True)
class Link(Command[Inode]):
    ino: int
    new_parent: int
    new_name: bytes
    now_ns: int
    cookie: int = 0  # as Mknod's


@dataclass(frozen=True, slots=True)
class MakeTmpfile(Command[Inode]):
    """open(O_TMPFILE): a regular file born without a name (nlink 0), an orphan from the start,
    kept while open and deleted at its last close (meta/tmpfile.py). `parent` is the directory it
    was opened in (its volume, its set-group-ID). `linkable`: opened without O_EXCL, so linkat(2)
    may give it a name (LinkTmpfile). `node`: the member holding it open (0 on a single node)."""

    parent: int
    ino: int
    mode: int
    uid: int
    gid: int
    now_ns: int
    linkable: bool
    node: int = 0


@dataclass(frozen=True, slots=True)
class LinkTmpfile(Command[Inode]):
    """linkat(2) of an O_TMPFILE file that has no name yet: Link, for the one orphan that may
    take a name again (a file unlinked while open may not: ENOENT, as Link answers)."""

    ino: int
    new_parent: int
    new_name: bytes
    now_ns: int


@dataclass(frozen=True, slots=True)
class Unlink(Command[int]):
    """unlink(2) or, with `is_dir`, rmdir(2). The last link of an inode makes it an orphan."""

    parent: int
    name: bytes
    is_dir: bool
    now_ns: int
    uid: int = 0  # the caller, for the sticky-bit rule


@dataclass(frozen=True, slots=True)
class UnlinkClosed(Unlink):
    """unlink(2) of a file nothing holds open, on a single node: the Unlink and, when it took the
    file's last name, the Purge that followed it, in one command (issue 40: a closed file's
    unlink was two commands). `ino`: the inode the proposer saw at the name and knows to be
    closed; only that one goes at once, and only if its orphan mark names no holder (a cluster's
    lists its members, who release it: ReleaseOrphans). An Unlink to every observer that knows
    Unlink only; returns the same (the inode that lost its link)."""

    ino: int = 0


@dataclass(frozen=True, slots=True)
class UnlinkAlone(UnlinkClosed):
    """A cluster member's unlink of a file no other member can reach (docs/delegations.md: a
    *fresh* file, created ahead by the proposer in a directory whose delegation never moved since)
    and nothing on the proposer holds open: when that was its last name it is deleted at once, as
    an UnlinkClosed on a single node, with no orphan mark for every member to release (a
    ReleaseOrphans from each, applied by each). The proposer's word is checked as far as the log
    can: the file's write lease must be the proposer's (a create ahead grants it), else the file is
    an orphan as after an Unlink. An UnlinkClosed to every observer that knows UnlinkClosed only."""


@dataclass(frozen=True, slots=True)
class Rename(Command[int]):
    old_parent: int
    old_name: bytes
    new_parent: int
    new_name: bytes
    flags: int  # RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT
    now_ns: int
    whiteout_ino: int = 0  # RENAME_WHITEOUT: the inode of the whiteout left at the old name
    uid: int = 0  # the whiteout's owner (the caller)
    gid: int = 0
    cookie: int = 0  # as Mknod's, for the new name (a replaced entry keeps its cookie)


@dataclass(frozen=True, slots=True)
class SetAttr(Command[Inode]):
    """chmod/chown/utimens/truncate. `None` leaves a field alone.

    A shrink to a size that is not block aligned comes with `tail`: a freshly written copy of the
    new last block whose bytes past the end are zero, keeping the invariant that mapped bytes past
    EOF read as zeros.
    """

    ino: int
    now_ns: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    tail: Extent | None = None


@dataclass(frozen=True, slots=True)
class WriteData(Command[Inode]):
    """Map freshly written extents into a file (copy-on-write: never overwrites in place).

    `extents` are in file order and disjoint (one flush of scattered writes is one command).
    Each is fresh space, except where it lies exactly on an unwritten extent of the file (same
    file blocks, same device blocks): the proposer wrote those reserved blocks in place, and they
    are the file's already.
    `size` is the file size the write reaches
    (the file grows to it, never shrinks). What they replace goes to the delayed-free list, whose
    grace period starts at `now_ns` (the commit). With `touch`, mtime becomes `mtime_ns` (0: now_ns):
    the time of the last write(2) the flush carries, since a write changes the times when it
    happens, not when its data reaches the device.
    """

    ino: int
    extents: tuple[Extent, ...]
    size: int
    now_ns: int
    kill_suid: bool = False
    touch: bool = True  # False: the times stay (compaction, or the kernel's write-back)
    mtime_ns: int = 0

    @property
    def changes_content(self) -> bool:
        """Did the file's bytes change? Not for a compaction (it moves bytes: no `touch`, no
        `mtime_ns`); yes for every write, also the kernel's write-back, which keeps the times (no
        `touch`) but names one. A linked site captures what changes content
        (WRITEBACK_CONTENT_LEVEL: below it, only a `touch`)."""
        return self.touch or self.mtime_ns != 0


@dataclass(frozen=True, slots=True)
class PunchHole(Command[Inode]):
    """fallocate(PUNCH_HOLE): unmap file blocks [first_block, end_block); the size stays.

    Whole blocks only: the proposer writes zeros over the partial blocks at the edges first. What
    is unmapped goes to the delayed-free list (a block a clone or snapshot shares loses a reference).
    """

    ino: int
    first_block: int
    end_block: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class Preallocate(Command[Inode]):
    """fallocate's reservation: map fresh device blocks into holes of the file as unwritten
    extents (no checksums: they read as zeros). The file's size and times stay (the proposer
    sets them as the mode asks). `extents` are in file order, disjoint, over holes only.
    """

    ino: int
    extents: tuple[Extent, ...]
    now_ns: int


@dataclass(frozen=True, slots=True)
class CloneRange(Command[Inode]):
    """copy_file_range of whole blocks by sharing them: file blocks [src_block, src_block+count)
    of `src_ino` become blocks [dst_block, dst_block+count) of `dst_ino`, copy-on-write.

    The apply reads the source's mapping as it is then (holes stay holes), drops a reference-counted
    share on each device range, and replaces whatever the destination mapped there. The
    destination grows to `size` if it is shorter; its mtime and ctime become `now_ns`.
    """

    src_ino: int
    src_block: int
    dst_ino: int
    dst_block: int
    count: int
    size: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class SetXattr(Command[None]):
    ino: int
    name: bytes
    value: bytes
    flags: int  # XATTR_CREATE | XATTR_REPLACE
    now_ns: int


@dataclass(frozen=True, slots=True)
class RemoveXattr(Command[None]):
    ino: int
    name: bytes
    now_ns: int


@dataclass(frozen=True, slots=True)
class ReserveInodes(Command[tuple[int, int]]):
    """Hand the proposer a range of fresh inode numbers so creates need no extra round trip."""

    count: int


@dataclass(frozen=True, slots=True)
class Purge(Command[bool]):
    """Delete an orphan (nlink 0) once no node holds it open; frees its data (delayed)."""

    ino: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class ReclaimFrees(Command[list[tuple[int, int]]]):
    """Return delayed-free extents whose grace period ends at or before `now_ns` to free space.
    A single node may name a later time than its clock: once no read it started before the frees
    is running, nothing can still read those blocks (fs/space.py, `wait_for_frees`)."""

    now_ns: int


@dataclass(frozen=True, slots=True)
class GrantGroups(Command[None]):
    node: int
    groups: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReleaseLeaked(Command[int]):
    """fsck --repair: return extents that nothing references to free space."""

    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class CreateVolume(Command[dict[str, Any]]):
    volume: int
    name: str
    ino: int
    capacity_bytes: int
    inode_limit: int
    now_ns: int
    source_kind: str = ""
    source_id: int = 0


@dataclass(frozen=True, slots=True)
class DeleteVolume(Command[bool]):
    volume: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class ResizeVolume(Command[dict[str, Any]]):
    volume: int
    capacity_bytes: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class CreateSnapshot(Command[dict[str, Any]]):
    snapshot: int
    name: str
    volume: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class DeleteSnapshot(Command[bool]):
    snapshot: int
    now_ns: int


# --- the log level (meta/levels.py LOG_LEVEL; semantics in meta/cluster_sm.py) ---------------------------
@dataclass(frozen=True, slots=True)
class SetLogLevel(Command[int | None]):
    """Every member's build decodes the commands of `level` (meta/levels.py, `LOG_LEVEL`): from
    now on any member may propose them. Never lowered (a lower level is a no-op). `members`: the
    active members whose builds said so; if the active members are others by the time it applies
    (one joined meanwhile, maybe on an older build), it changes nothing and the leader asks again."""

    level: int
    members: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PlanTierObject(Command[int]):
    """Before an object is uploaded: give it the next object id and a `pending` record (returned:
    the id), so that an upload a crash interrupts is found and deleted (meta/tiered.py)."""

    now_ns: int


@dataclass(frozen=True, slots=True)
class CommitTierObject(Command[int]):
    """After the object's PUT was confirmed: `sources[i]`, an extent of `inos[i]` as it was read (on
    the device, or in another object when repacking), moves to the object's next
    `sources[i].count` blocks, in order. A source the file no longer maps exactly so (same blocks,
    same checksums, shared with nothing) stays where it is and its copy in the object is dead.
    The blocks moved from are freed after the grace period;
    sizes, times and block counts do not change. Refused (ESTALE) unless the object is pending."""

    object_id: int
    inos: tuple[int, ...]
    sources: tuple[Extent, ...]
    now_ns: int


@dataclass(frozen=True, slots=True)
class AbandonTierObjects(Command[int]):
    """Pending objects whose uploads will never be committed (the engine that planned them is
    gone): dead from `now_ns`, to be deleted from the store. Others are left alone."""

    object_ids: tuple[int, ...]
    now_ns: int


@dataclass(frozen=True, slots=True)
class ForgetTierObjects(Command[int]):
    """Dead objects that were deleted from the store: their records go. Others are left alone."""

    object_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LinkSite(Command[int]):
    """Pair this site with another (cross-site replication, meta/sites/): from now on what the
    namespace commands do is captured for `peer`, and what exists already is captured as creates."""

    peer: bytes  # the other site's 16-byte id (its cluster id)
    now_ns: int
    peer_ca_pem: bytes = b""  # the CA the peer's certificates chain to (pinned when linking)
    peer_addresses: tuple[str, ...] = ()  # its site listener(s), host:port


@dataclass(frozen=True, slots=True)
class UnlinkSite(Command[None]):
    now_ns: int


@dataclass(frozen=True, slots=True)
class PauseCapture(Command[None]):
    """The outbox passed `[site] outbox_max_operations` (the peer away for long): stop capturing,
    keeping the link, after noting what each object is as the peer was last told
    (meta/sites/bound.py). The outbox still ships; the peer's operations still apply."""

    now_ns: int


@dataclass(frozen=True, slots=True)
class ResumeCapture(Command[int]):
    """The peer acknowledged the whole outbox: capture what changed here while paused, as a relink
    does (cost follows the objects changed, not the commands run), and capture again from now on.
    Returns the number of operations that puts in the outbox."""

    now_ns: int


@dataclass(frozen=True, slots=True)
class UpdateSiteLink(Command[None]):
    """What the linked site says of itself now (its answer to `Cursor`), kept with the link: the
    addresses its members listen at (members come and go after pairing) and the serials of its
    removed members' certificates, which its CA signed: their calls are refused from now on."""

    addresses: tuple[str, ...]
    revoked: tuple[str, ...]  # hex serials
    now_ns: int


@dataclass(frozen=True, slots=True)
class ApplyRemote(Command[Applied]):
    """Apply a batch of the linked site's operations (crdt/ops.py encodings), in its stamp order.

    `after`: the peer stamp the batch continues from (packed; empty: from the link's start), which
    must be what this site applied last: a batch sent twice, or by two senders at once, is refused.
    `extents`: the bytes of the batch's content operations, written to this site's device before
    the proposal (copy-on-write, as WriteData's), `extent_counts[i]` of them for the i-th."""

    peer: bytes
    after: bytes
    operations: tuple[bytes, ...]
    extents: tuple[Extent, ...]
    extent_counts: tuple[int, ...]
    now_ns: int


@dataclass(frozen=True, slots=True)
class ApplyRemoteSharing(Command[Applied]):
    """ApplyRemote whose content operations may also reuse blocks this site already has (delta
    transfer, design note 50): `shared` are extents of the object's file here, exactly as its
    map holds them now, in the places the new version keeps them unchanged; `shared_counts[i]`
    of them for the i-th content operation. The state machine refuses the batch (EAGAIN) when the
    map no longer holds one of them: the sender then ships the whole version. A command of its
    own, not two more fields of ApplyRemote: members on an older build decode the log until a
    member proposes one (log level 9)."""

    peer: bytes
    after: bytes
    operations: tuple[bytes, ...]
    extents: tuple[Extent, ...]
    extent_counts: tuple[int, ...]
    shared: tuple[Extent, ...]
    shared_counts: tuple[int, ...]
    now_ns: int


@dataclass(frozen=True, slots=True)
class ForgetSite(Command[int]):
    """Both sites are past `through` (a packed stamp): drop the tree's undo log and the outbox up
    to there, and release the objects deleted by then."""

    through: bytes
    now_ns: int


@dataclass(frozen=True, slots=True)
class FoldCapture(Command[int]):
    """Fold up to `limit` of the linked site's pending captures (meta/sites/pending.py), oldest
    first, into its replicated tree, registers and outbox; returns how many it folded. Proposed
    by the node running the link while any are pending (repl/folding.py); every other command
    but a few folds them all first anyway (meta/sites/capture.py, UNFOLDED)."""

    limit: int


@dataclass(frozen=True, slots=True)
class SeedSite(Command[int]):
    """Seed the next `limit` entries of a link's initial sync in walk order (meta/sites/seeding.py)."""

    limit: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class ResolveConflict(Command[Applied]):
    """An operator resolved the conflict with key `conflict` (meta/sites/resolve.py) keeping the winner,
    the loser or both (crdt/ops.py KEEPS): closed on both sites, the copy kept of the loser
    dropped. A losing move kept is made again, as a new move; a losing content, attribute or
    extended attribute kept was written back through the mount before this command."""

    conflict: bytes
    keep: str
    now_ns: int


@dataclass(frozen=True, slots=True)
class Fenced(Command[object]):
    """Every command a cluster member proposes, wrapped with who proposed it and under which lease
    epoch: refused with EIO once that epoch has expired, and new extents must lie in the
    proposer's own allocation groups. This is what keeps a node that slept through its lease from
    committing anything, even a command it had already sent."""

    node: int
    epoch: int
    commands: tuple[Command[Any], ...]


@dataclass(frozen=True, slots=True)
class Batch(Command[list[object]]):
    """Several commands applied atomically (e.g. one flush of many files). Results are per command."""

    commands: tuple[Command[Any], ...] = field(default_factory=tuple)


COMMAND_LEVELS: dict[type, int] = {
    PunchHole: 4, CloneRange: 4, SetLogLevel: 4, Preallocate: 5,
    PlanTierObject: 6, CommitTierObject: 6, AbandonTierObjects: 6, ForgetTierObjects: 6,
    LinkSite: 10, UnlinkSite: 7, ApplyRemote: 7, ForgetSite: 7, ResolveConflict: 8, ApplyRemoteSharing: 9,
    UpdateSiteLink: 10, MakeTmpfile: 13, LinkTmpfile: 13, FoldCapture: 15, UnlinkClosed: 17,
    PauseCapture: 18, ResumeCapture: 18, SeedSite: 20, UnlinkAlone: 23, MknodFor: 24,
}


def level_of(command: type) -> int:
    """The cluster log level a command needs (those of the builds before the gate: the base)."""
    return COMMAND_LEVELS.get(command, BASE_LOG_LEVEL)


def applied(command: object, result: Any) -> Iterator[tuple[object, Any]]:
    """Each command that `command` carries, with its own result: Batch and Fenced unwrapped at any
    depth. The state machine applies one wrapped command as itself and several as a Batch (a list
    of results, an FsError in place of each refused one); a wrapper refused as a whole (an expired
    lease epoch) refuses everything it carries. Observers of the log see commands this way: a
    hand-over proposed while changes wait in the pipeline arrives nested in the pipeline's Batch."""
    if isinstance(command, Fenced) and len(command.commands) == 1:
        yield from applied(command.commands[0], result)
    elif isinstance(command, (Batch, Fenced)):
        if isinstance(result, list) and len(result) == len(command.commands):
            for sub, outcome in zip(command.commands, result):
                yield from applied(sub, outcome)
        else:
            for sub in command.commands:
                yield from applied(sub, result)
    else:
        yield command, result
