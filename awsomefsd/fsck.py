"""`awsomefsd fsck`: check that metadata and device agree; with --repair, fix what is safe to fix.

Checks, in order: both superblock copies; that the metadata belongs to this device; the namespace
(every entry names an existing inode, link counts, directory parents, readdir cookies, orphans,
unreachable inodes); the space map (no block both used and free, no block neither: leaked);
per-inode block counts (those two in awsomefsd/meta/check.py, which alone touches the tables);
and with --verify-data every extent's checksums.

Exit status follows e2fsck: 0 clean, 1 problems found and all repaired, 4 problems left.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from awsomefsd.config import Settings
from awsomefsd.io.checksum import first_bad_block
from awsomefsd.io.device import aligned_buffer
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.io.superblock import read_superblock, write_superblocks
from awsomefsd.meta.check import check_namespace, check_space
from awsomefsd.meta.log import LocalLog
from awsomefsd.meta.records import Extent
from awsomefsd.progress import Progress

if TYPE_CHECKING:
    from awsomefsd.node import Core

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
        assert isinstance(core.log, LocalLog), "fsck works on the state as committed: the local log"
        print("checking namespace", flush=True)
        check_namespace(core.log, core.sm, report, repair)
        print("checking space map", flush=True)
        layout = core.superblock.layout
        check_space(core.log, core.sm, (layout.data_start_block, layout.data_blocks), report, repair)
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


def _verify_data(core: Core, report: Report) -> None:
    """Read every written extent and check its checksums, with progress on a terminal (the bytes
    to read are counted first: a metadata scan, quick next to the reads)."""
    def written() -> Iterator[tuple[int, Extent]]:
        for ino in core.meta.inode_numbers():
            for ext in core.meta.all_extents(ino):
                if not ext.unwritten:  # reserved extents hold nothing to verify
                    yield ino, ext

    buf = aligned_buffer(256 * BLOCK_SIZE)
    progress = Progress("verifying", sum(ext.count for _, ext in written()) * BLOCK_SIZE, in_bytes=True)
    checked = 0
    try:
        for ino, ext in written():
            view = memoryview(buf)[: ext.count * BLOCK_SIZE]
            core.device.read_into(view, ext.dev_block * BLOCK_SIZE)
            bad = first_bad_block(view, ext.checksums)
            if bad >= 0:
                report.problem(f"inode {ino}: checksum mismatch at file block {ext.file_block + bad}")
            checked += ext.count
            progress.advance(ext.count * BLOCK_SIZE)
    finally:
        progress.close()
    print(f"  {checked * BLOCK_SIZE >> 20} MiB verified", flush=True)
