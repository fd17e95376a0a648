"""A create, or a look that found nothing, in a directory another member holds is sent to that
member (issue 42, design note 145), instead of the delegation coming here.

Nodes changing one directory take turns with its delegation, and a create on a node that waits
for its turn waited for the others' turns and hand-overs: the longest create of three creators in
one directory was 0.5 s. The holder's view of the directory is complete (no other node changes
it), so it can answer a look there, and run a create there, for another member at once:

- **look** (`LOOK`): the kernel's LOOKUP of a name. The holder answers from its view whether the
  name is there. Absent: this node answers "no such name" as it is (it was absent when the holder
  answered, and every change acknowledged before the look is in that view). Present: the holder
  names the inode and the log index to apply first (past every change it acknowledged, for a file
  it created ahead: design note 148), and this node answers with its own inode if its view has
  that one at that name once applied that far. Otherwise, or with no answer, the delegation comes
  here as before, and the name is read here.
- **create** (`CREATE`): open(O_CREAT) of a regular file. The requester reserves the inode number
  from its own range and sends it with the name, the mode, the owner and its liveness-lease epoch;
  the holder runs a `MknodFor` ahead of the log under its delegation (its view has the file at
  once, as for its own creates), with the file's write lease going to the requester, and answers
  once the log committed it, with the index to apply. The requester applies up to that index and
  answers the kernel: the file is in its view, with the lease its writes need.

Whatever goes wrong (the holder handed the directory over meanwhile, is slow, unreachable, or an
older build) the create goes the usual way, taking the delegation, **with the same inode
number**: if the holder made the file after all, the hand-over commits it first, and the name
found there with that number is this create's own. The requester also asks for the delegation in
the background at each create it sends, so turns still rotate: the next creates run here at local
speed once the turn comes, and the sent ones only fill the wait.

Both messages are fixed binary headers and the name (`decode_*` check every length: a malformed
request is refused whole).
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import MAX_NAME_BYTES

LOOK = "look"
CREATE = "create"
KINDS = (LOOK, CREATE)

Forward = Callable[[int, str, bytes], Awaitable[bytes]]
"""`forward(node, kind, request)`: the holder's answer; raises ConnectionError when it cannot be
asked or did not answer in time (the daemon's wiring: the Member service, cluster/rpc.py)."""

_LOOK = struct.Struct(">QQ")  # directory, the log index the requester applied; the name follows
_CREATE = struct.Struct(">QQIIIIQQ")  # directory, inode, mode, uid, gid, requester, its epoch, the index it applied
_ANSWER = struct.Struct(">BHQQ")  # status, errno, value, the index the holder applied
"""`value`: the inode found (a look's FOUND, whose index is the one to apply first), the log index to
apply (a create's DONE), or the member the answering node reads as the holder (NOT_HOLDER: it
handed the directory over, and the request goes there next, with the answering node's applied
index to catch up to)."""


class Status(enum.IntEnum):
    DONE = 0  # made and committed: apply up to the index
    ABSENT = 1  # no such name in the holder's view
    FOUND = 2  # the name is there
    NOT_HOLDER = 3  # the holder does not hold the directory (any more), or runs nothing for others
    FAILED = 4  # the create's own error (EEXIST, EDQUOT, ...): the errno says
    TAKE = 5  # held for a look only (a stat, an open): the requester takes it the usual way, as before


@dataclass
class ForwardCounts:
    """What this node sent to holders and served for others (`awsomefs_forwarded_total`)."""

    looks: int = 0  # looks a holder answered "no such name"
    creates: int = 0  # creates a holder made for this node
    failed: int = 0  # sends that got no answer (the usual way followed)
    served: int = 0  # creates this node made for others


class BadRequest(ValueError):
    """A forwarded request that does not decode: refused whole."""


def look_request(directory: int, name: bytes, seen: int) -> bytes:
    """`seen`: the log index the requester applied. It found the holder there: a holder that does
    not hold the directory by its own view catches up that far before it says so (it may not have
    applied its grant yet)."""
    return _LOOK.pack(directory, seen) + name


def decode_look(request: bytes) -> tuple[int, bytes, int]:
    """(directory, name, index the requester applied)."""
    name = request[_LOOK.size:]
    if len(request) < _LOOK.size or not 0 < len(name) <= MAX_NAME_BYTES:
        raise BadRequest("a look needs a directory and a name")
    directory, seen = _LOOK.unpack_from(request)
    return directory, name, seen


def create_request(directory: int, name: bytes, ino: int, mode: int, uid: int, gid: int, requester: int,
                   epoch: int, seen: int) -> bytes:
    return _CREATE.pack(directory, ino, mode, uid, gid, requester, epoch, seen) + name


def decode_create(request: bytes) -> tuple[int, bytes, int, int, int, int, int, int, int]:
    """(directory, name, inode, mode, uid, gid, requester, requester's epoch, index it applied)."""
    name = request[_CREATE.size:]
    if len(request) < _CREATE.size or not 0 < len(name) <= MAX_NAME_BYTES:
        raise BadRequest("a create needs its fields and a name")
    directory, ino, mode, uid, gid, requester, epoch, seen = _CREATE.unpack_from(request)
    return directory, name, ino, mode, uid, gid, requester, epoch, seen


def answer(status: Status, *, error: int = 0, value: int = 0, applied: int = 0) -> bytes:
    return _ANSWER.pack(status, error, value, applied)


def decode_answer(raw: bytes) -> tuple[Status, int, int, int]:
    """(status, errno, value, the holder's applied index); ConnectionError when it does not decode."""
    if len(raw) != _ANSWER.size:
        raise ConnectionError(f"an answer of {len(raw)} bytes")
    status, error, value, applied = _ANSWER.unpack(raw)
    return _status(status), error, value, applied


def _status(value: int) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise ConnectionError(f"an answer with status {value}") from None


def raise_failed(error: int) -> NoReturn:
    """A create's own error, as the holder's state machine gave it."""
    raise FsError(error if 0 < error < 4096 else errno.EIO, "refused by the directory's holder")
