"""Kernel cache invalidation: what a committed command makes stale, and a worker that tells the kernel.

Every node applies every committed command, but only the proposer's kernel saw the request. The
others still hold dentries (positive and negative) and attributes for up to their timeouts, and page
cache with `keep_cache` until told otherwise. `targets()` names the cache entries a command changed;
`Invalidator` hands them to the kernel on one worker thread.

Why a thread: a notification is a write to /dev/fuse that the kernel may hold until a related
request (a lookup in the same directory, a setattr of the same inode) is answered, and those
requests are answered on the trio thread. Called there, it would wait for itself.

Order does not matter for correctness: every target is submitted after its command applied, so
processing it at any later time makes the kernel ask again and see the new state.
"""

from __future__ import annotations

import enum
import errno
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import trio

from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import SNAPSHOTS_INO, VOLUMES_INO, Applied, snapshot_dir_name, volume_dir_name

log = logging.getLogger(__name__)

MAX_PENDING_TARGETS = 65_536
BATCH_TARGETS = 1_024  # per worker-thread trip: bounds how stale `drain()` progress can be


class Kind(enum.Enum):
    INODE = "inode"  # attributes and page cache
    ATTR = "attr"  # attributes only
    ENTRY = "entry"  # the dentry `name` in directory `ino`


@dataclass(frozen=True, slots=True)
class Target:
    """One kernel cache entry to forget. For an entry, `ino` is the parent directory."""

    kind: Kind
    ino: int
    name: bytes = b""

    @classmethod
    def inode(cls, ino: int) -> Target:
        return cls(Kind.INODE, ino)

    @classmethod
    def attr_only(cls, ino: int) -> Target:
        return cls(Kind.ATTR, ino)

    @classmethod
    def entry(cls, parent: int, name: bytes) -> Target:
        return cls(Kind.ENTRY, parent, name)


def encode_targets(items: Iterable[Target]) -> list[list[Any]]:
    """Targets as JSON rows, for the session record a hand-over leaves (fuse/kernel/takeover.py)."""
    return [[t.kind.value, t.ino, t.name.hex()] for t in items]


def decode_targets(rows: Iterable[Any]) -> list[Target]:
    """`encode_targets` read back; a row that is not one is skipped and logged (the record is
    ours, so that is a bug or a damaged file: its cache entry then waits for its timeout)."""
    decoded = []
    for row in rows:
        try:
            kind, ino, name = row
            decoded.append(Target(Kind(kind), int(ino), bytes.fromhex(name)))
        except (TypeError, ValueError) as exc:
            log.warning("ignoring a kernel invalidation the daemon before handed over: %r (%s)", row, exc)
    return decoded


def compact(items: Iterable[Target]) -> list[Target]:
    """Drop repeats, keeping first positions; attributes-only of an inode also invalidated in full
    become the full invalidation (it drops the attributes too)."""
    items = list(items)
    full = {t.ino for t in items if t.kind is Kind.INODE}
    return list(dict.fromkeys(Target.inode(t.ino) if t.kind is Kind.ATTR and t.ino in full else t for t in items))


# -- what each command makes stale --------------------------------------------------------------
Rule = Callable[[Any, Any], list[Target]]


def _nothing(cmd: Any, result: Any) -> list[Target]:
    return []


def _changed_ino(result: Any) -> list[Target]:
    """Unlink and rename return the inode that lost a link (0: none): its nlink and ctime moved."""
    return [Target.attr_only(result)] if isinstance(result, int) and not isinstance(result, bool) and result else []


def _mknod(cmd: c.Mknod, result: Any) -> list[Target]:
    # the name may be cached as a negative dentry; the parent gains mtime (and nlink for a dir)
    return [Target.entry(cmd.parent, cmd.name), Target.attr_only(cmd.parent)]


def _link(cmd: c.Link | c.LinkTmpfile, result: Any) -> list[Target]:
    return [Target.entry(cmd.new_parent, cmd.new_name), Target.attr_only(cmd.new_parent), Target.attr_only(cmd.ino)]


def _unlink(cmd: c.Unlink, result: Any) -> list[Target]:
    return [Target.entry(cmd.parent, cmd.name), Target.attr_only(cmd.parent), *_changed_ino(result)]


def _unlink_closed(cmd: c.UnlinkClosed, result: Any) -> list[Target]:
    """An unlink, and the inode itself when it was `cmd.ino` (it may have been deleted with it)."""
    return _unlink(cmd, result) + ([Target.inode(cmd.ino)] if result == cmd.ino else [])


def _rename(cmd: c.Rename, result: Any) -> list[Target]:
    """Both names now point elsewhere (or nowhere); an exchange needs the same two entries. The moved
    inode's ctime is not knowable from the command: it lags by at most the attribute timeout."""
    return [
        Target.entry(cmd.old_parent, cmd.old_name), Target.entry(cmd.new_parent, cmd.new_name),
        Target.attr_only(cmd.old_parent), Target.attr_only(cmd.new_parent), *_changed_ino(result),
    ]


def _setattr(cmd: c.SetAttr, result: Any) -> list[Target]:
    return [Target.inode(cmd.ino) if cmd.size is not None else Target.attr_only(cmd.ino)]


def _write_data(cmd: c.WriteData, result: Any) -> list[Target]:
    """Compaction (`touch=False`) moves bytes without changing them, their size or the times."""
    return [Target.inode(cmd.ino)] if cmd.touch else []


def _punch_hole(cmd: c.PunchHole, result: Any) -> list[Target]:
    return [Target.inode(cmd.ino)]


def _preallocate(cmd: c.Preallocate, result: Any) -> list[Target]:
    return [Target.attr_only(cmd.ino)]  # st_blocks; reserved blocks read as the holes they were


def _clone_range(cmd: c.CloneRange, result: Any) -> list[Target]:
    return [Target.inode(cmd.dst_ino)]  # the source's bytes and attributes did not change


def _xattr(cmd: c.SetXattr | c.RemoveXattr, result: Any) -> list[Target]:
    return [Target.attr_only(cmd.ino)]  # ctime; FUSE does not cache xattr values


def _release_orphans(cmd: cc.ReleaseOrphans, result: Any) -> list[Target]:
    """Some of the inodes may have been deleted (result: how many); which ones is not returned."""
    return [Target.inode(ino) for ino in cmd.inos] if result else []


def _purge(cmd: c.Purge, result: Any) -> list[Target]:
    return [] if result is False else [Target.inode(cmd.ino)]  # False: still linked, nothing deleted


def _volume_dir(cmd: c.CreateVolume | c.DeleteVolume, result: Any) -> list[Target]:
    """A volume is the directory /.volumes/vol-<id>: it appears or goes (with its whole subtree,
    which the kernel drops with the dentry)."""
    return [Target.entry(VOLUMES_INO, volume_dir_name(cmd.volume)), Target.attr_only(VOLUMES_INO)]


def _snapshot_dir(cmd: c.CreateSnapshot | c.DeleteSnapshot, result: Any) -> list[Target]:
    return [Target.entry(SNAPSHOTS_INO, snapshot_dir_name(cmd.snapshot)), Target.attr_only(SNAPSHOTS_INO)]


def _applied_remote(cmd: c.ApplyRemote | c.ApplyRemoteSharing | c.ResolveConflict, result: Any) -> list[Target]:
    """Another site's changes, or a conflict's resolution: the state machine says which entries
    and inodes they touched."""
    if not isinstance(result, Applied):
        return []
    return changed_targets(result)


def changed_targets(changed: Applied) -> list[Target]:
    """What the state machine of a linked site says it changed (meta/sites/): entries and inodes."""
    return [*(Target.entry(parent, name) for parent, name in changed.entries), *map(Target.inode, changed.inodes)]


def _carried(cmd: c.Batch | c.Fenced, result: Any) -> list[Target]:
    return [t for sub, res in c.applied(cmd, result) for t in targets(sub, res)]


RULES: dict[type, Rule] = {
    c.Mknod: _mknod,
    c.MknodFor: _mknod,
    c.Link: _link,
    c.LinkTmpfile: _link,
    c.MakeTmpfile: _nothing,  # no entry, no change to the directory
    c.Unlink: _unlink,
    c.UnlinkClosed: _unlink_closed,
    c.UnlinkAlone: _unlink_closed,
    c.Rename: _rename,
    c.SetAttr: _setattr,
    c.WriteData: _write_data,
    c.PunchHole: _punch_hole,
    c.Preallocate: _preallocate,
    c.CloneRange: _clone_range,
    c.SetXattr: _xattr,
    c.RemoveXattr: _xattr,
    c.Purge: _purge,
    cc.ReleaseOrphans: _release_orphans,
    c.CreateVolume: _volume_dir,
    c.DeleteVolume: _volume_dir,
    c.CreateSnapshot: _snapshot_dir,
    c.DeleteSnapshot: _snapshot_dir,
    c.Batch: _carried,
    c.Fenced: _carried,
    # space, allocation, membership and leases: tables the kernel never caches (nor statfs). A
    # write lease moving on changes no cached bytes; the holder's flush arrives as WriteData.
    c.ReserveInodes: _nothing,
    c.ReclaimFrees: _nothing,
    c.GrantGroups: _nothing,
    c.ReleaseLeaked: _nothing,
    c.ResizeVolume: _nothing,
    cc.InitCluster: _nothing,
    cc.AddMember: _nothing,
    cc.SetMemberCert: _nothing,
    cc.UpdateMemberAddress: _nothing,
    cc.RemoveMember: _nothing,
    cc.SetJoinVerifier: _nothing,
    c.SetLogLevel: _nothing,
    cc.RenewLease: _nothing,
    cc.ExpireNode: _nothing,
    cc.ClaimGroups: _nothing,
    cc.AcquireWriteLease: _nothing,
    cc.ReleaseWriteLease: _nothing,
    # tiering moves where a file's bytes are kept, never what they are, its size or its times
    c.PlanTierObject: _nothing,
    c.CommitTierObject: _nothing,
    c.AbandonTierObjects: _nothing,
    c.ForgetTierObjects: _nothing,
    # cross-site replication: a link changes nothing cached; forgetting releases unnamed inodes
    c.LinkSite: _nothing,
    c.UnlinkSite: _nothing,
    c.ForgetSite: _nothing,
    c.FoldCapture: _nothing,  # what it folds shows nothing new (meta/sites/capture.py, DEFERRED)
    c.SeedSite: _nothing,  # a name group it shows again is heard as a capture's (`local_side_effects`)
    c.UpdateSiteLink: _nothing,
    c.PauseCapture: _nothing,
    c.ResumeCapture: _nothing,  # a name group it shows again is heard as a capture's (`local_side_effects`)
    c.ApplyRemote: _applied_remote,
    c.ApplyRemoteSharing: _applied_remote,
    c.ResolveConflict: _applied_remote,
}
"""Every command type, with what it makes stale; a unit test checks it covers codec.COMMAND_TAGS."""


def targets(command: object, result: object | None = None, *, merged: bool = True) -> list[Target]:
    """The kernel cache entries `command` made stale, deduplicated, in a stable order.

    `result` is what the state machine's apply returned (None when unknown): it names inodes the
    command does not (the inode an unlink or rename took a link from). A failed command (`result`
    an FsError) changed nothing. An unknown command type gives [] (RULES must list it).
    `merged` False: as the rule gives them, for a caller that keeps only some inodes' and then
    `compact`s what is left (the same targets: `compact` merges only targets of one inode); a
    member that applies another's change its kernel never saw had spent 2-3 µs merging.
    """
    if isinstance(result, FsError):
        return []
    rule = RULES.get(type(command))
    if rule is None:
        return []
    return compact(rule(command, result)) if merged else rule(command, result)


# -- telling the kernel -------------------------------------------------------------------------
class Kernel(Protocol):
    """The two FUSE notifications; raise OSError like the kernel (ENOENT: nothing cached)."""

    def invalidate_inode(self, ino: int, attr_only: bool) -> None: ...

    def invalidate_entry(self, parent: int, name: bytes) -> None: ...


@runtime_checkable
class NameForgetter(Protocol):
    """A transport that can make the kernel look up again every name it caches (our own /dev/fuse
    session: FUSE_NOTIFY_INC_EPOCH, Linux 6.16 and later). False: refused."""

    def forget_names(self) -> bool: ...


class MountedKernel:
    """The notifications of whichever transport serves this process's mount (`attach`); none
    while nothing is mounted (ENOENT: the kernel caches nothing of ours then). One per process,
    `MOUNTED`: a daemon serves one mount, and the invalidator exists before the mount does."""

    def __init__(self) -> None:
        self.target: Kernel | None = None

    def attach(self, target: Kernel | None) -> None:
        self.target = target

    def _require(self) -> Kernel:
        if self.target is None:
            raise OSError(errno.ENOENT, "nothing is mounted")
        return self.target

    def invalidate_inode(self, ino: int, attr_only: bool) -> None:
        self._require().invalidate_inode(ino, attr_only)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self._require().invalidate_entry(parent, name)

    def forget_names(self) -> bool:
        """Every cached name, positive or negative, is looked up again before its next use. Unlike
        an entry invalidation it takes no lock in the kernel (it moves the connection's epoch on)
        and waits for no request, so it may be sent from the trio thread, and a daemon killed
        meanwhile exits. False when nothing is mounted or the transport or kernel cannot."""
        target = self.target
        return isinstance(target, NameForgetter) and target.forget_names()


MOUNTED = MountedKernel()


def kernel_caches(ino: int) -> bool:
    """Does the kernel have inode `ino` of this process's mount in its cache? Asked with an
    attribute invalidation, which answers ENOENT for an inode it does not have and otherwise
    only marks its attributes stale: it touches no page and no directory, so unlike the other
    notifications it waits for no request and may be sent from the trio thread."""
    try:
        MOUNTED.invalidate_inode(ino, attr_only=True)
    except OSError as exc:
        return exc.errno != errno.ENOENT
    return True


class Invalidator:
    """A bounded queue of targets, drained on one worker thread.

    `submit()` never blocks: it is called from the apply path, which must not wait on the kernel (the
    kernel may be waiting on us). The queue coalesces a target already waiting. It holds
    `max_pending` distinct targets only when the worker is wedged in the kernel or the apply loop
    ran through a long stretch of log without a checkpoint; then new targets are dropped,
    counted in `dropped` and logged once per overflow: the kernel then sees the change when its
    entry or attribute timeout runs out (and drops page cache when it sees the new mtime or size),
    the same staleness as without invalidation. Blocking would risk a deadlock, and FUSE has no
    "forget everything" notification that could stand in for what was dropped.

    Counters: `invalidations` (done, ENOENT included: nothing was cached), `errors` (other OSError,
    logged), `dropped`. Use from the trio thread only. Cancel `run()` while FUSE is still served: a
    notification in flight can wait for a request about the same entry, and `run()` waits for it
    (abandoning the thread could race the unmount).
    """

    def __init__(self, kernel: Kernel | None = None, *, max_pending: int = MAX_PENDING_TARGETS,
                 batch_targets: int = BATCH_TARGETS) -> None:
        assert max_pending > 0 and batch_targets > 0
        self.kernel: Kernel = kernel if kernel is not None else MOUNTED
        self.max_pending = max_pending
        self.batch_targets = batch_targets
        self.invalidations = 0
        self.errors = 0
        self.dropped = 0
        self._pending: dict[Target, None] = {}  # an ordered set
        self._in_flight: list[Target] = []  # the batch on the worker thread
        self._sent = 0  # how many of it the worker has sent (or found nothing cached for)
        self._left: dict[Target, None] = {}  # not sent when run() ended: `left()`
        self._submitted = 0  # one ticket per submit() that left something pending
        self._done = 0  # every ticket up to this one is processed
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._started = False
        self._closed = False
        self._overflowing = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    def settled(self) -> bool:
        """Is everything submitted processed (a `drain` now would not wait)?"""
        return self._done >= self._submitted

    def submit(self, items: Iterable[Target]) -> None:
        """Queue targets for the worker. After run() ended they are kept for `left()`."""
        if self._closed:
            self._keep(items)
            return
        for t in items:
            if t in self._pending:
                continue  # the queued one is processed after this call: it covers this one
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                if not self._overflowing:
                    self._overflowing = True
                    log.warning("kernel invalidation queue full (%d targets): dropping; caches may be "
                                "stale until their timeouts", self.max_pending)
                continue
            self._pending[t] = None
        if self._pending:
            self._submitted += 1
            self._wakeup.set()

    def left(self) -> list[Target]:
        """What run() had not sent to the kernel when it ended, in order: the rest of the batch it
        was sending, the queue, and what was submitted since. A daemon handing its mount over
        passes them to the next one, which sends them once it serves (a notification may wait for
        a request to be answered, so none can be sent after serving stopped); dropping them would
        leave a name, or a file's pages, cached stale until a timeout or for ever."""
        assert self._closed, "left() is read after run() ended"
        return list(self._left)

    def _keep(self, items: Iterable[Target]) -> None:
        for t in items:
            if len(self._left) >= self.max_pending and t not in self._left:
                self.dropped += 1
                continue
            self._left[t] = None

    async def drain(self) -> None:
        """Return once everything submitted before the call is processed (or run() has ended).

        Cancelling it only stops the wait.
        """
        await trio.lowlevel.checkpoint()
        goal = self._submitted
        while self._done < goal and not self._closed:
            await self._progress.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Process batches until cancelled; call once. Targets not sent when it ends: `left()`."""
        assert not self._started, "Invalidator.run() is called once"
        self._started = True
        task_status.started()
        try:
            while True:
                if not self._pending:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                batch = list(itertools.islice(self._pending, self.batch_targets))
                for t in batch:
                    del self._pending[t]
                covered = self._submitted if not self._pending else None
                if len(self._pending) < self.max_pending:
                    self._overflowing = False
                self._in_flight, self._sent = compact(batch), 0
                done, errors = await trio.to_thread.run_sync(self._process, self._in_flight)
                self._in_flight = []
                self.invalidations += done
                self.errors += errors
                if covered is not None:
                    self._done = covered
                self._progress.set()
                self._progress = trio.Event()
        finally:
            self._closed = True
            self._keep([*self._in_flight[self._sent:], *self._pending])
            self._pending.clear()
            self._progress.set()

    def _process(self, batch: list[Target]) -> tuple[int, int]:
        """On the worker thread: (done, failed). Checks for cancellation between notifications;
        `_sent` counts those the kernel was given (read once the thread has returned)."""
        done = failed = 0
        first: tuple[Target, OSError] | None = None
        for t in batch:
            trio.from_thread.check_cancelled()
            try:
                if t.kind is Kind.ENTRY:
                    self.kernel.invalidate_entry(t.ino, t.name)
                else:
                    self.kernel.invalidate_inode(t.ino, t.kind is Kind.ATTR)
            except OSError as exc:
                self._sent += 1
                if exc.errno != errno.ENOENT:
                    failed += 1
                    first = first or (t, exc)
                    continue
            else:
                self._sent += 1
            done += 1
        if first is not None:
            log.warning("%d of %d kernel cache invalidations failed; first %s: %s", failed, len(batch), *first)
        return done, failed
