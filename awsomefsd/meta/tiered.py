"""Objects of the object store in the replicated state (design note 47), and the commands that
move file data into them.

An object is a run of block addresses above TIER_BASE_BLOCK (meta/records.py). A file-map record
points there as it would point at the device, so reading, sharing (snapshots, clones) and the
delayed free of tiered blocks go through the same code as device blocks; only the last step of a
free differs: a tiered block lowers its object's count of live blocks instead of joining the free
space, and an object with none left is dead, to be deleted from the store.

The life of an object, each step a command in the log:
1. `PlanTierObject`: the object gets its id and a `pending` record before anything is uploaded.
   A crash after the PUT leaves this record, so the object can be found and deleted: nothing
   needs to list the bucket.
2. The engine PUTs it and checks the store's answer.
3. `CommitTierObject` points the file ranges at it, but only those still mapped exactly as they
   were read (copy-on-write means the same blocks with the same checksums hold the same bytes);
   the blocks they leave go to the delayed-free list. Data the files changed meanwhile is dead in
   the object from the start. The ranges come from the device (tiering) or from objects that are
   mostly dead (repacking: once their last live block has moved, they die).
4. `AbandonTierObjects`: a pending object whose upload will not be committed is dead.
5. Once deleted from the store, `ForgetTierObjects` drops the record of a dead object.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import lmdb

from awsomefsd.meta import commands as c
from awsomefsd.meta import filemap
from awsomefsd.meta.errors import FsError, SpaceCorruption
from awsomefsd.meta.records import (
    MAX_EXTENT_BLOCKS,
    MAX_OBJECTS_PER_COMMAND,
    OBJECT_SPAN_BLOCKS,
    Extent,
    TierObject,
    TierObjectState,
    is_tiered,
    object_block,
    object_of,
    u64,
)
from awsomefsd.meta.store import MetaStore

if TYPE_CHECKING:
    from awsomefsd.meta.state_machine import StateMachine

MAX_OBJECT_BLOCKS = OBJECT_SPAN_BLOCKS // 2
"""An object is at most 128 MiB: its addresses never run into the next object's, so two extents
of different objects can never look contiguous (the file map merges contiguous extents)."""
_RECORD = struct.Struct(">BQQqq")
_STATES: tuple[TierObjectState, ...] = ("pending", "live", "dead")


class TierTables:
    """The `tiered` table: object id -> (state, blocks, live blocks, created, changed)."""

    def __init__(self, store: MetaStore) -> None:
        self.db = store.db["tiered"]

    # -- reads ----------------------------------------------------------------------------------
    def get(self, txn: lmdb.Transaction[bytes], object_id: int) -> TierObject | None:
        raw = txn.get(u64(object_id), db=self.db)
        return None if raw is None else unpack_object(object_id, raw)

    def all(self, txn: lmdb.Transaction[bytes]) -> Iterator[TierObject]:
        for key, value in txn.cursor(self.db):
            yield unpack_object(int.from_bytes(key, "big"), value)

    def _put(self, txn: lmdb.Transaction[bytes], obj: TierObject) -> None:
        value = _RECORD.pack(_STATES.index(obj.state), obj.blocks, obj.live_blocks, obj.created_ns, obj.changed_ns)
        txn.put(u64(obj.id), value, db=self.db)

    # -- the steps of an object's life --------------------------------------------------------------
    def plan(self, txn: lmdb.Transaction[bytes], cmd: c.PlanTierObject,
             next_number: Callable[[lmdb.Transaction[bytes], bytes], int]) -> int:
        object_id = next_number(txn, b"tier_next")
        self._put(txn, TierObject(object_id, "pending", 0, 0, cmd.now_ns, cmd.now_ns))
        return object_id

    def commit(self, sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.CommitTierObject) -> int:
        """Returns the blocks that now live in the object (those of sources still mapped as read)."""
        obj = self.get(txn, cmd.object_id)
        if obj is None or obj.state != "pending":
            raise FsError(errno.ESTALE, f"object {cmd.object_id} is not pending "
                          f"({'unknown' if obj is None else obj.state}): its upload was abandoned")
        if len(cmd.inos) != len(cmd.sources) or not cmd.sources:
            raise FsError(errno.EINVAL, "CommitTierObject needs one inode per source extent")
        total = sum(src.count for src in cmd.sources)
        if total > MAX_OBJECT_BLOCKS:
            raise FsError(errno.EINVAL, f"an object holds at most {MAX_OBJECT_BLOCKS} blocks")
        for src in cmd.sources:  # device extents, or tiered ones of other objects (repacking)
            if (not 0 < src.count <= MAX_EXTENT_BLOCKS or src.unwritten
                    or (is_tiered(src.dev_block) and object_of(src.dev_block)[0] == cmd.object_id)):
                raise FsError(errno.EINVAL, f"not an extent that can move into object {cmd.object_id}: {src}")
        fmap = sm.db["fmap"]
        offset = live = 0
        for ino, src in zip(cmd.inos, cmd.sources):
            target = object_block(cmd.object_id, offset)
            offset += src.count
            if not self._still_mapped(sm, txn, ino, src):
                continue
            filemap.unmap_range(txn, fmap, ino, src.file_block, src.end_block)
            filemap.map_extent(txn, fmap, ino, Extent(src.file_block, target, src.count, src.checksums))
            sm.defer_free(txn, [(src.dev_block, src.count)], cmd.now_ns)
            live += src.count
        self._put(txn, TierObject(obj.id, "live" if live else "dead", total, live, obj.created_ns, cmd.now_ns))
        return live

    def _still_mapped(self, sm: StateMachine, txn: lmdb.Transaction[bytes], ino: int, src: Extent) -> bool:
        """Does `ino` still map exactly `src` (its device blocks, with its checksums), shared with
        nothing? A snapshot or clone sharing the blocks would keep them on the device anyway."""
        inode = sm.ns.get_inode(txn, ino)
        if inode is None or not inode.is_reg:
            return False
        found = b""
        expect = src.file_block
        for ext in filemap.extents_in(txn, sm.db["fmap"], ino, src.file_block, src.end_block):
            piece = ext.slice(max(ext.file_block, src.file_block), min(ext.end_block, src.end_block))
            if piece.file_block != expect or piece.dev_block != src.dev_block + (expect - src.file_block):
                return False
            found += piece.checksums
            expect = piece.end_block
        return (expect == src.end_block and found == src.checksums
                and not sm.space.shared(txn, src.dev_block, src.count))

    def abandon(self, txn: lmdb.Transaction[bytes], cmd: c.AbandonTierObjects) -> int:
        """Returns how many pending objects became dead (others are left as they are)."""
        _check_count(cmd.object_ids)
        done = 0
        for object_id in cmd.object_ids:
            obj = self.get(txn, object_id)
            if obj is not None and obj.state == "pending":
                self._put(txn, TierObject(obj.id, "dead", obj.blocks, 0, obj.created_ns, cmd.now_ns))
                done += 1
        return done

    def forget(self, txn: lmdb.Transaction[bytes], cmd: c.ForgetTierObjects) -> int:
        """Returns how many dead objects were forgotten (live or pending ones stay)."""
        _check_count(cmd.object_ids)
        done = 0
        for object_id in cmd.object_ids:
            obj = self.get(txn, object_id)
            if obj is not None and obj.state == "dead":
                txn.delete(u64(object_id), db=self.db)
                done += 1
        return done

    def release(self, txn: lmdb.Transaction[bytes], start: int, count: int, now_ns: int) -> None:
        """Tiered blocks nothing references any more: their object has that many fewer live."""
        object_id, offset = object_of(start)
        obj = self.get(txn, object_id)
        if obj is None or obj.state != "live" or offset + count > obj.blocks or count > obj.live_blocks:
            raise SpaceCorruption(f"tiered blocks {start}+{count} are not live blocks of object {object_id} ({obj})")
        live = obj.live_blocks - count
        self._put(txn, TierObject(obj.id, "live" if live else "dead", obj.blocks, live, obj.created_ns,
                                  now_ns if not live else obj.changed_ns))


def _check_count(object_ids: tuple[int, ...]) -> None:
    if len(object_ids) > MAX_OBJECTS_PER_COMMAND:
        raise FsError(errno.EINVAL, f"at most {MAX_OBJECTS_PER_COMMAND} objects per command")


def unpack_object(object_id: int, raw: bytes) -> TierObject:
    state, blocks, live, created, changed = _RECORD.unpack(raw)
    return TierObject(object_id, _STATES[state], blocks, live, created, changed)
