"""Block-range edits of a file's map: punching a hole, reserving blocks, and cloning blocks from
another file.

Both change which device blocks a range of file blocks points to without moving any data, which
is what makes them cheap: a punched range is unmapped (its blocks are freed after the grace
period), a reserved range maps fresh blocks as unwritten extents, a cloned range points at the
source's blocks, whose reference count (`SpaceMap.share`)
keeps them until the last file or snapshot that maps them lets go. A later write to either file
is copy-on-write as always, so the two never see each other's changes. Unwritten blocks are never
shared (a clone or snapshot of them is a hole, which reads the same): the first write to them goes
in place, which is safe only for blocks one file maps.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import lmdb

from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta import filemap
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, MAX_FILE_SIZE_BYTES, MAX_RANGE_BLOCKS, Extent, Inode

if TYPE_CHECKING:
    from awsomefsd.meta.state_machine import StateMachine

def _check_range(first: int, count: int) -> None:
    if first < 0 or not 0 < count <= MAX_RANGE_BLOCKS:
        raise FsError(errno.EINVAL, f"block range {first}+{count} is out of bounds")
    if (first + count) * BLOCK_SIZE > MAX_FILE_SIZE_BYTES:
        raise FsError(errno.EFBIG)


def _regular_file(sm: StateMachine, txn: lmdb.Transaction[bytes], ino: int) -> Inode:
    inode = sm.ns.require_inode(txn, ino)
    if not inode.is_reg:
        raise FsError(errno.EISDIR if inode.is_dir else errno.EINVAL)
    return inode


def apply_punch_hole(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.PunchHole) -> Inode:
    inode = _regular_file(sm, txn, cmd.ino)
    sm.volumes.check_writable(txn, inode.volume)
    _check_range(cmd.first_block, cmd.end_block - cmd.first_block)
    superseded = filemap.unmap_range(txn, sm.db["fmap"], inode.ino, cmd.first_block, cmd.end_block)
    removed = sum(n for _, n in superseded)
    sm.defer_free(txn, superseded, cmd.now_ns)
    sm.volumes.charge(txn, inode.volume, blocks=-removed, inodes=0, enforce=False)
    inode.blocks -= removed
    inode.mtime_ns = inode.ctime_ns = cmd.now_ns
    sm.ns.put_inode(txn, inode)
    return inode


def apply_preallocate(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.Preallocate) -> Inode:
    inode = _regular_file(sm, txn, cmd.ino)
    sm.volumes.check_writable(txn, inode.volume)
    if not cmd.extents:
        raise FsError(errno.EINVAL, "nothing to reserve")
    for prev, nxt in zip(cmd.extents, cmd.extents[1:]):
        if prev.end_block > nxt.file_block:
            raise FsError(errno.EINVAL, "Preallocate extents must be in file order and disjoint")
    fmap = sm.db["fmap"]
    for ext in cmd.extents:
        if not ext.unwritten or not 0 < ext.count <= MAX_EXTENT_BLOCKS or ext.file_block < 0:
            raise FsError(errno.EINVAL, f"not an unwritten extent: {ext.file_block}+{ext.count}")
        if ext.end_block * BLOCK_SIZE > MAX_FILE_SIZE_BYTES:
            raise FsError(errno.EFBIG)
        if filemap.mapped_blocks(txn, fmap, inode.ino, ext.file_block, ext.end_block):
            # the proposer reserves holes under the file's lock and write lease: a bug, not a race
            raise FsError(errno.EIO, f"file blocks {ext.file_block}+{ext.count} are mapped already")
    sm.space_check_new(txn, [(ext.dev_block, ext.count) for ext in cmd.extents])
    reserved = sum(ext.count for ext in cmd.extents)
    sm.volumes.charge(txn, inode.volume, blocks=reserved, inodes=0)
    for ext in cmd.extents:
        sm.space.take(txn, ext.dev_block, ext.count)
        filemap.map_extent(txn, fmap, inode.ino, ext)
    inode.blocks += reserved
    sm.ns.put_inode(txn, inode)
    return inode


def apply_clone_range(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.CloneRange) -> Inode:
    src = _regular_file(sm, txn, cmd.src_ino)
    dst = _regular_file(sm, txn, cmd.dst_ino)
    sm.volumes.check_writable(txn, dst.volume)
    _check_range(cmd.src_block, cmd.count)
    _check_range(cmd.dst_block, cmd.count)
    if cmd.size > MAX_FILE_SIZE_BYTES or cmd.size < 0:
        raise FsError(errno.EFBIG)
    if src.ino == dst.ino and abs(cmd.src_block - cmd.dst_block) < cmd.count:
        raise FsError(errno.EINVAL, "a clone within one file must not overlap itself")
    fmap = sm.db["fmap"]
    src_end, dst_end = cmd.src_block + cmd.count, cmd.dst_block + cmd.count
    pieces = [ext.slice(max(ext.file_block, cmd.src_block), min(ext.end_block, src_end))
              for ext in filemap.extents_in(txn, fmap, src.ino, cmd.src_block, src_end) if not ext.unwritten]
    cloned = sum(p.count for p in pieces)
    replaced = filemap.mapped_blocks(txn, fmap, dst.ino, cmd.dst_block, dst_end)
    sm.volumes.charge(txn, dst.volume, blocks=cloned - replaced, inodes=0)
    superseded = filemap.unmap_range(txn, fmap, dst.ino, cmd.dst_block, dst_end)
    shift = cmd.dst_block - cmd.src_block
    for piece in pieces:
        sm.space.share(txn, piece.dev_block, piece.count)
        filemap.map_extent(txn, fmap, dst.ino, Extent(piece.file_block + shift, piece.dev_block, piece.count,
                                                      piece.checksums))
    sm.defer_free(txn, superseded, cmd.now_ns)
    dst.blocks += cloned - replaced
    dst.size = max(dst.size, cmd.size)
    dst.mtime_ns = dst.ctime_ns = cmd.now_ns
    sm.ns.put_inode(txn, dst)
    return dst
