"""The one error type that crosses from metadata and data code to the FUSE adapter, and the
store's own failures (which no retry repairs)."""

from __future__ import annotations

import errno
import os
import struct

import lmdb

STORE_FAILURES: tuple[type[BaseException], ...] = (lmdb.Error,)
"""The node-local metadata store failing (its disk full or failing, a corrupt environment): a
background duty that meets one stops the daemon (awsomefsd/duty.py) instead of retrying."""

CAUSES = ("lease", "fence", "stall", "lost-writes", "checksum", "store")
"""Why an EIO happened, where the code knows it (FsError.cause): the FUSE adapter logs such an EIO
with the node, the file and the reason, and counts it by cause (awsomefs_eio_total)."""
UNEXPLAINED = "other"
"""The cause an EIO without one is counted under."""


COMMAND_BUGS: tuple[type[BaseException], ...] = (
    ArithmeticError, AssertionError, AttributeError, LookupError, TypeError, ValueError, struct.error,
    lmdb.BadValsizeError,
)
"""What a command's apply raises when its values slipped past the state machine's checks (a
number too large to pack, a key too long for LMDB): the same on every replica that applies the
same command to the same state, so a replicated log may refuse that command with EIO everywhere
and go on. Not in it: the store's own failures and the process's (lmdb.Error, MemoryError,
OSError), which are this node's alone; refusing a command for those would make replicas differ."""


class LogAheadOfBuild(Exception):
    """The replicated log holds what this build cannot decode: the cluster runs a newer build (its
    log level, meta/levels.py LOG_LEVEL, is above this one's), so this member was downgraded.
    It cannot apply the log past that entry; the daemon stops with this one-line reason
    (awsomefsd/duty.py) rather than a traceback."""


class SpaceCorruption(Exception):
    """A command would allocate space that is not free, free space that is free, or free tiered
    blocks their object does not count as live: a bug or a corrupt state; the command is refused
    and the operator must run fsck."""


_STRERROR: dict[int, str] = {}


def _strerror(err: int) -> str:
    """os.strerror, kept per errno: an error answer is a common request's (ENOENT of a lookup,
    ENODATA of the security.capability look before every first write)."""
    text = _STRERROR.get(err)
    if text is None:
        text = _STRERROR[err] = os.strerror(err)
    return text


class FsError(Exception):
    """A POSIX error for the caller: `errno` goes back to the application unchanged. An EIO that a
    fault explains names its `cause` (one of CAUSES)."""

    def __init__(self, err: int, message: str = "", *, cause: str = "") -> None:
        super().__init__(err, message or _strerror(err))
        assert not cause or cause in CAUSES, cause
        self.errno = err
        self.cause = cause

    def __repr__(self) -> str:
        return f"FsError({errno.errorcode.get(self.errno, self.errno)}, {self.args[1]!r})"


class StoreUnavailable(FsError):
    """Tiered data the object store could not give back now (an outage, a timeout, wrong bytes
    twice): EIO for the reader, but a flush that needed the old bytes of a tiered block keeps its
    buffered writes and tries again (fs/flusher.py), since nothing of them is lost yet."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message, cause="store")


class OutcomeUnknown(FsError):
    """EIO for a change whose fate is unknown: the log may still commit it (its proposal timed
    out, or the node it went through died mid-call). Whatever the change references must be
    treated as committed: the extents reserved for its data must not go back to the allocator,
    or a later write could overwrite them after all (`certainly_not_applied`)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message, cause="stall")


def certainly_not_applied(failure: BaseException) -> bool:
    """Did the change whose proposal raised `failure` certainly not commit? True for the state
    machine's refusals and for failures that prove the command never reached the log; False for
    an unknown outcome and for anything that interrupted the wait (a cancellation)."""
    return isinstance(failure, FsError) and not isinstance(failure, OutcomeUnknown)


class Delegated(FsError):
    """A namespace change in a directory whose delegation another node holds, proposed through
    the log by a node that does not hold it: the state machine refuses it, because the holder may
    have acknowledged changes to that directory the log has not seen yet (docs/delegations.md).
    Not for applications: the proposer takes the delegation (its hand-over commits the holder's
    changes first) and proposes again."""

    def __init__(self, directory: int, holder: int) -> None:
        super().__init__(errno.EAGAIN, f"directory {directory} is delegated to node {holder}")
        self.directory = directory
        self.holder = holder
