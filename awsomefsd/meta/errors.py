"""The one error type that crosses from metadata and data code to the FUSE adapter."""

from __future__ import annotations

import errno
import os


class FsError(Exception):
    """A POSIX error for the caller: `errno` goes back to the application unchanged."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.errno = err

    def __repr__(self) -> str:
        return f"FsError({errno.errorcode.get(self.errno, self.errno)}, {self.args[1]!r})"
