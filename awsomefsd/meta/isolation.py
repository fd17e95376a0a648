"""One command's bug stays that command's: applied in a child transaction, it is undone alone.

The state machine validates every command before it writes (state_machine.py), so a command it
refuses leaves nothing behind. A check it lacks shows up as another exception (a value too large
to pack, a key too long for LMDB) after part of the change was written, inside a transaction
that holds other commands' acknowledged changes too: a Raft Ready's entries, a Batch's commands
acknowledged ahead of the log. `apply_isolated` applies the command in a nested LMDB transaction:
such a failure aborts only that child, the in-memory mirrors are rebuilt from what the parent
holds, and the command is refused with EIO, the same on every replica (errors.COMMAND_BUGS are
deterministic), so the log goes on past it instead of stopping every replica at the same entry.

LocalLog does not use this for its own batch, which may hold 50,000 commands (a child per command
made applying 40,000 creates in one batch cost 31-35 µs a command instead of 18-22 µs): it applies
its batch again without the failed command (meta/log.py). A Raft Ready's transaction is small.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

import lmdb

from awsomefsd.meta.commands import Command, R
from awsomefsd.meta.errors import COMMAND_BUGS, FsError

if TYPE_CHECKING:
    from awsomefsd.meta.state_machine import StateMachine

log = logging.getLogger(__name__)


def apply_isolated(sm: StateMachine, txn: lmdb.Transaction[bytes], command: Command[R]) -> R:
    """`sm.apply(txn, command)`, except that a bug it meets (COMMAND_BUGS) undoes only this
    command's writes and becomes FsError(EIO). A refusal (FsError) is returned as ever; other
    failures (the store's) undo this command and propagate. `txn` must be an LMDB write
    transaction (a prediction's overlay has nothing acknowledged to protect: it applies bare)."""
    if not isinstance(txn, lmdb.Transaction):
        return sm.apply(txn, command)
    child = sm.store.env.begin(write=True, parent=txn)
    try:
        result = sm.apply(child, command)
    except FsError:
        child.commit()  # a refusal wrote nothing; its mirrors and tables stay as they are
        raise
    except COMMAND_BUGS as exc:
        child.abort()
        sm.load(txn)  # what the command changed in memory goes with what it wrote
        log.error("applying %r failed: refused with EIO, nothing of it kept", command, exc_info=True)
        raise FsError(errno.EIO, f"{type(command).__name__} failed: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        child.abort()
        raise
    child.commit()
    return result
