"""Checking and repairing the metadata tables (`awsomefsd fsck`; awsomefsd/cli/fsck.py drives it).

Works offline on the state as committed, through the local log's open batch: repairs are written
into it and committed with the batch. Findings go to `report` as they are found.
"""

from __future__ import annotations

import time
from typing import Protocol

import lmdb

from awsomefsd.meta import commands as c
from awsomefsd.meta.filemap import all_extents
from awsomefsd.meta.freespace import FreeSpaceMap
from awsomefsd.meta.log import LocalLog
from awsomefsd.meta.records import (
    ROOT_INO,
    U64,
    U64_PAIR,
    Inode,
    cookie_key,
    is_tiered,
    object_block,
    object_of,
    read_dentry_value,
    u64,
)
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.tmpfile import TMPFILES


class Findings(Protocol):
    def problem(self, text: str) -> None: ...

    def fixed(self, text: str) -> None: ...


def check_namespace(log: LocalLog, sm: StateMachine, report: Findings, repair: bool) -> None:
    """Every entry names an existing inode; link counts, directory parents, readdir cookies and
    orphan records agree; no inode is unreachable. Repairs write into the log's open batch."""
    txn = log.read_txn()
    inodes: dict[int, Inode] = {}
    for key, value in txn.cursor(sm.db["inodes"]):
        ino = U64.unpack(key)[0]
        inodes[ino] = Inode.unpack(ino, value)
    links: dict[int, int] = {ino: 0 for ino in inodes}
    subdirs: dict[int, int] = {ino: 0 for ino in inodes}
    dangling: list[tuple[int, bytes]] = []
    for key, value in txn.cursor(sm.db["dentries"]):
        parent = U64.unpack_from(key)[0]
        name = bytes(key[8:])
        child, cookie = read_dentry_value(value)
        if child not in inodes or parent not in inodes:
            dangling.append((parent, name))
            continue
        links[child] += 1
        if inodes[child].is_dir:
            subdirs[parent] += 1
            if inodes[child].parent != parent:
                report.problem(f"directory {child} records parent {inodes[child].parent}, found in {parent}")
        if txn.get(cookie_key(parent, cookie), db=sm.db["cookies"]) != name:
            report.problem(f"readdir cookie of {parent}/{name!r} is missing")
            if repair:
                txn.put(cookie_key(parent, cookie), name, db=sm.db["cookies"])
                report.fixed(f"restored readdir cookie of {parent}/{name!r}")
    for parent, name in dangling:
        report.problem(f"entry {parent}/{name!r} names a missing inode")
        if repair:
            sm.ns.remove_entry(txn, parent, name)
            report.fixed(f"removed dangling entry {parent}/{name!r}")
    for key, name in list(txn.cursor(sm.db["cookies"])):
        parent, _cookie = U64_PAIR.unpack(key)
        if txn.get(u64(parent) + bytes(name), db=sm.db["dentries"]) is None:
            report.problem(f"readdir cookie for {parent}/{bytes(name)!r} has no entry")
            if repair:
                txn.delete(key, db=sm.db["cookies"])
                report.fixed(f"removed stale cookie {parent}/{bytes(name)!r}")
    orphans = {U64.unpack(k)[0] for k, _ in txn.cursor(sm.db["orphans"])}
    for ino, inode in inodes.items():
        expected = (2 + subdirs[ino]) if inode.is_dir else links[ino]
        if ino == ROOT_INO:
            continue
        if links[ino] == 0 and ino not in orphans:
            if sm.sites.keeps(txn, ino):
                continue  # deleted, kept while another site's move may bring it back (meta/sites/forget.py)
            report.problem(f"inode {ino} is unreachable")
            if repair:
                inode.nlink = 0
                sm.ns.put_inode(txn, inode)
                txn.put(u64(ino), b"", db=sm.db["orphans"])
                sm.apply(txn, c.Purge(ino, time.time_ns()))
                report.fixed(f"removed unreachable inode {ino}")
            continue
        if links[ino] and inode.nlink != expected:
            report.problem(f"inode {ino} has link count {inode.nlink}, expected {expected}")
            if repair:
                inode.nlink = expected
                sm.ns.put_inode(txn, inode)
                report.fixed(f"set link count of inode {ino} to {expected}")
    for ino in orphans:
        if ino not in inodes:
            report.problem(f"orphan record for missing inode {ino}")
            if repair:
                txn.delete(u64(ino), db=sm.db["orphans"])
                report.fixed(f"dropped orphan record {ino}")
    for key, _ in list(txn.cursor(sm.db[TMPFILES])):
        ino = U64.unpack(key)[0]
        if ino not in orphans:  # named since, or deleted: linkat may not name it (again)
            report.problem(f"O_TMPFILE mark on inode {ino}, which is no orphan")
            if repair:
                txn.delete(key, db=sm.db[TMPFILES])
                report.fixed(f"dropped the O_TMPFILE mark of inode {ino}")


def check_space(log: LocalLog, sm: StateMachine, data_extent: tuple[int, int], report: Findings,
                repair: bool) -> None:
    """No block is both mapped and free, none is neither (leaked: `data_extent` is the device's
    data area), and every inode counts the blocks it maps."""
    txn = log.read_txn()
    used = FreeSpaceMap()  # reused as a set of extents: "free" here means "seen in use"
    tiered: dict[int, FreeSpaceMap] = {}  # object -> the blocks of it something refers to
    overlaps = 0
    inodes_blocks: dict[int, int] = {}
    for key, value in txn.cursor(sm.db["inodes"]):
        ino = U64.unpack(key)[0]
        inode = Inode.unpack(ino, value)
        count = 0
        for ext in all_extents(txn, sm.db["fmap"], ino):
            count += ext.count
            start, n = ext.dev_block, ext.count
            if is_tiered(start):
                _add_uncovered(tiered.setdefault(object_of(start)[0], FreeSpaceMap()), start, n)
                continue
            if ext.unwritten and _shared(sm, txn, start, n):
                report.problem(f"inode {ino} shares its unwritten blocks {start}+{n}: a write in place would "
                               "change another file")
            if used.overlaps_free(start, n):
                shared = _shared(sm, txn, start, n)
                if not shared:
                    overlaps += 1
                    report.problem(f"inode {ino} shares blocks {start}+{n} with another file without a reference")
                _add_uncovered(used, start, n)
            else:
                used.add(start, n)
        if count != inode.blocks:
            report.problem(f"inode {ino} counts {inode.blocks} blocks, maps {count}")
            if repair:
                inode.blocks = count
                sm.ns.put_inode(txn, inode)
                report.fixed(f"set block count of inode {ino} to {count}")
        inodes_blocks[ino] = count
    for _seq, _nb, pairs in sm.space.deferred(txn):
        for start, n in pairs:
            _add_uncovered(tiered.setdefault(object_of(start)[0], FreeSpaceMap()) if is_tiered(start) else used,
                           start, n)
    _check_objects(sm, txn, tiered, report)
    for start, n in sm.space.free_extents(txn):
        if used.overlaps_free(start, n):
            report.problem(f"blocks {start}+{n} are free but in use")
    leaked = FreeSpaceMap([data_extent])
    for start, n in list(used):
        _remove_covered(leaked, start, n)
    for start, n in sm.space.free_extents(txn):
        _remove_covered(leaked, start, n)
    leaks = list(leaked)
    if leaks:
        total = sum(n for _, n in leaks)
        report.problem(f"{total} blocks in {len(leaks)} extents are leaked (neither used nor free)")
        if repair:
            sm.apply(txn, c.ReleaseLeaked(tuple(leaks)))
            report.fixed(f"returned {total} leaked blocks to free space")
    del overlaps


def _check_objects(sm: StateMachine, txn: lmdb.Transaction[bytes], referenced: dict[int, FreeSpaceMap],
                   report: Findings) -> None:
    """Every tiered block referred to lies in a live object, and each object counts as live exactly
    the blocks referred to (no repair: a wrong count would delete or keep an object wrongly, and
    the operator must look)."""
    objects = {obj.id: obj for obj in sm.space.tiered.all(txn)}
    for object_id, blocks in sorted(referenced.items()):
        obj = objects.get(object_id)
        span = (object_block(object_id), obj.blocks if obj is not None else 0)
        outside = sum(n for start, n in blocks if start < span[0] or start + n > span[0] + span[1])
        if obj is None or obj.state != "live" or outside:
            report.problem(f"tiered data refers to object {object_id}, which is "
                           f"{'unknown' if obj is None else obj.state}, or beyond its {span[1]} blocks")
        elif blocks.free_blocks != obj.live_blocks:
            report.problem(f"object {object_id} counts {obj.live_blocks} live blocks, {blocks.free_blocks} are referred to")
    for object_id, obj in sorted(objects.items()):
        if obj.state == "live" and object_id not in referenced:
            report.problem(f"object {object_id} counts {obj.live_blocks} live blocks, nothing refers to it")


def _shared(sm: StateMachine, txn: lmdb.Transaction[bytes], start: int, n: int) -> bool:
    return bool(sm.space._ref_records(txn, start, start + n))


def _add_uncovered(m: FreeSpaceMap, start: int, n: int) -> None:
    """Add the parts of [start, start+n) not yet in `m`."""
    pos = start
    end = start + n
    while pos < end:
        if m.overlaps_free(pos, 1):
            pos += 1
            continue
        run = pos
        while run < end and not m.overlaps_free(run, 1):
            run += 1
        m.add(pos, run - pos)
        pos = run


def _remove_covered(m: FreeSpaceMap, start: int, n: int) -> None:
    """Remove the parts of [start, start+n) present in `m`."""
    if m.contains_free(start, n):
        m.remove(start, n)
        return
    for pos in range(start, start + n):
        if m.contains_free(pos, 1):
            m.remove(pos, 1)
