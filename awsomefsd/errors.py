"""The operator's error (floor 1): any package may raise it for a mistake the person at the
keyboard can fix (a setting, a path, an answer from the cluster); the command line prints its text
as one line and exits 1, never a traceback. It lives this low so that the composition (formation)
raises it without importing the command line above it."""

from __future__ import annotations


class OperatorError(Exception):
    """A user-facing error: printed as one line, exit status 1, no traceback."""
