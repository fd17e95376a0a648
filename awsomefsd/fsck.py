"""`awsomefsd fsck`: check that metadata and device agree; with --repair, fix what is safe to fix.

Checks, in order: both superblock copies; that the metadata belongs to this device; the namespace
(every entry names an existing inode, link counts, directory parents, readdir cookies, orphans,
unreachable inodes); the space map (no block both used and free, no block neither: leaked);
per-inode block counts; and with --verify-data every extent's checksums.

Exit status follows e2fsck: 0 clean, 1 problems found and all repaired, 4 problems left.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from awsomefsd.config import Settings
from awsomefsd.io.allocator import FreeSpaceMap
from awsomefsd.io.checksum import first_bad_block
from awsomefsd.io.device import aligned_buffer
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.io.superblock import read_superblock, write_superblocks
from awsomefsd.meta import commands as c
from awsomefsd.meta.filemap import all_extents
from awsomefsd.meta.records import ROOT_INO, U64, U64_PAIR, Inode, cookie_key, read_dentry_value, u64

log = logging.getLogger(__name__)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  problem: {text}", flush=True)

    def fixed(self, text: str) -> None:
        self.repaired.append(text)
        print(f"  repaired: {text}", flush=True)


def run_fsck(settings: Settings, *, repair: bool, verify_data: bool) -> int:
    from awsomefsd.node import open_core

    report = Report()
    _check_superblocks(settings, report, repair)
    core = open_core(settings, log_kind="local")
    try:
        print("checking namespace", flush=True)
        _check_namespace(core, report, repair)
        print("checking space map", flush=True)
        _check_space(core, report, repair)
        if verify_data:
            print("verifying data checksums", flush=True)
            _verify_data(core, report)
        core.log.commit()
    finally:
        core.close()
    unrepaired = len(report.problems) - len(report.repaired)
    if not report.problems:
        print("fsck: clean")
        return 0
    if unrepaired <= 0:
        print(f"fsck: {len(report.problems)} problems found, all repaired")
        return 1
    print(f"fsck: {len(report.problems)} problems found, {unrepaired} not repaired"
          + ("" if repair else " (run with --repair)"))
    return 4


def _check_superblocks(settings: Settings, report: Report, repair: bool) -> None:
    from awsomefsd.io.device import BlockDevice

    assert settings.device.path is not None
    device = BlockDevice.open(settings.device.path)
    try:
        reading = read_superblock(device)
        if not (reading.primary_ok and reading.copy_ok):
            which = "primary" if not reading.primary_ok else "backup"
            report.problem(f"{which} superblock is damaged")
            if repair:
                write_superblocks(device, reading.superblock)
                report.fixed(f"rewrote the {which} superblock")
    finally:
        device.close()


def _check_namespace(core: object, report: Report, repair: bool) -> None:
    sm = core.sm  # type: ignore[attr-defined]
    log_ = core.log  # type: ignore[attr-defined]
    txn = log_.read_txn()
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


def _check_space(core: object, report: Report, repair: bool) -> None:
    sm = core.sm  # type: ignore[attr-defined]
    txn = core.log.read_txn()  # type: ignore[attr-defined]
    layout = core.superblock.layout  # type: ignore[attr-defined]
    used = FreeSpaceMap()  # reused as a set of extents: "free" here means "seen in use"
    overlaps = 0
    inodes_blocks: dict[int, int] = {}
    for key, value in txn.cursor(sm.db["inodes"]):
        ino = U64.unpack(key)[0]
        inode = Inode.unpack(ino, value)
        count = 0
        for ext in all_extents(txn, sm.db["fmap"], ino):
            count += ext.count
            start, n = ext.dev_block, ext.count
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
            _add_uncovered(used, start, n)
    for start, n in sm.space.free_extents(txn):
        if used.overlaps_free(start, n):
            report.problem(f"blocks {start}+{n} are free but in use")
    leaked = FreeSpaceMap([(layout.data_start_block, layout.data_blocks)])
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


def _shared(sm: object, txn: object, start: int, n: int) -> bool:
    return bool(sm.space._ref_records(txn, start, start + n))  # type: ignore[attr-defined]


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


def _verify_data(core: object, report: Report) -> None:
    sm = core.sm  # type: ignore[attr-defined]
    device = core.device  # type: ignore[attr-defined]
    txn = core.log.read_txn()  # type: ignore[attr-defined]
    buf = aligned_buffer(256 * BLOCK_SIZE)
    checked = 0
    for key, _ in list(txn.cursor(sm.db["inodes"])):
        ino = U64.unpack(key)[0]
        for ext in all_extents(txn, sm.db["fmap"], ino):
            view = memoryview(buf)[: ext.count * BLOCK_SIZE]
            device.read_into(view, ext.dev_block * BLOCK_SIZE)
            bad = first_bad_block(view, ext.checksums)
            if bad >= 0:
                report.problem(f"inode {ino}: checksum mismatch at file block {ext.file_block + bad}")
            checked += ext.count
            if sys.stdout.isatty() and checked % 25600 == 0:
                print(f"\r  {checked * BLOCK_SIZE >> 20} MiB verified", end="", flush=True)
    print(f"  {checked * BLOCK_SIZE >> 20} MiB verified", flush=True)
