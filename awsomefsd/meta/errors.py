"""The one error type that crosses from metadata and data code to the FUSE adapter, and the
store's own failures (which no retry repairs)."""

from __future__ import annotations

import errno
import os

import lmdb

STORE_FAILURES: tuple[type[BaseException], ...] = (lmdb.Error,)
"""The node-local metadata store failing (its disk full or failing, a corrupt environment): a
background duty that meets one stops the daemon (awsomefsd/duty.py) instead of retrying."""

CAUSES = ("lease", "fence", "stall", "lost-writes", "checksum")
"""Why an EIO happened, where the code knows it (FsError.cause): the FUSE adapter logs such an EIO
with the node, the file and the reason, and counts it by cause (awsomefs_eio_total)."""


class FsError(Exception):
    """A POSIX error for the caller: `errno` goes back to the application unchanged. An EIO that a
    fault explains names its `cause` (one of CAUSES)."""

    def __init__(self, err: int, message: str = "", *, cause: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        assert not cause or cause in CAUSES, cause
        self.errno = err
        self.cause = cause

    def __repr__(self) -> str:
        return f"FsError({errno.errorcode.get(self.errno, self.errno)}, {self.args[1]!r})"


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
