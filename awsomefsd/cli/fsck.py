"""`awsomefsd fsck`: check that metadata and device agree; with --repair, fix what is safe to fix.

Checks, in order: both superblock copies; that the metadata belongs to this device; the namespace
(every entry names an existing inode, link counts, directory parents, readdir cookies, orphans,
unreachable inodes); the space map (no block both used and free, no block neither: leaked);
per-inode block counts (those two in awsomefsd/meta/check.py, which alone touches the tables);
and with --verify-data every extent's checksums.

Exit status follows e2fsck: 0 clean, 1 problems found and all repaired, 4 problems left.
"""

from __future__ import annotations

import functools
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
from awsomefsd.meta.records import Extent, is_tiered, object_of
from awsomefsd.progress import Progress

if TYPE_CHECKING:
    from awsomefsd.daemon.node import Core

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
    from awsomefsd.daemon.node import open_core

    report = Report()
    _check_superblocks(settings, report, repair)
    core = open_core(settings, log_kind="local", initialise=False, tiering=False)
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
            _verify_tiered(core, settings, report)
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
                if not ext.unwritten and not is_tiered(ext.dev_block):  # reserved: nothing to verify
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


def _verify_tiered(core: Core, settings: Settings, report: Report) -> None:
    """Read every tiered extent back from the object store and check its checksums (ranged GETs,
    one per extent); without [tier] configured, say how much could not be checked."""
    tiered = [(ino, ext) for ino in core.meta.inode_numbers() for ext in core.meta.all_extents(ino)
              if is_tiered(ext.dev_block)]
    if not tiered:
        return
    total = sum(ext.count for _, ext in tiered) * BLOCK_SIZE
    if not settings.tier.enabled:
        report.problem(f"{total >> 20} MiB of tiered data not verified: no object store configured ([tier])")
        return
    from awsomefsd.tier.credentials import load_credentials
    from awsomefsd.tier.source import object_key
    from awsomefsd.tier.store import ObjectStore, Retry, StoreError, with_retries

    tier = settings.tier
    store = ObjectStore(tier.endpoint, tier.bucket, load_credentials(tier.credentials_file, tier.profile),
                        region=tier.region, prefix=tier.prefix, path_style=tier.path_style)
    cluster_id = str(core.superblock.cluster_id)
    progress = Progress("verifying tiered", total, in_bytes=True)
    try:
        for ino, ext in tiered:
            object_id, offset = object_of(ext.dev_block)
            key = object_key(cluster_id, object_id)
            try:
                data = with_retries(functools.partial(store.get, key, offset * BLOCK_SIZE, ext.count * BLOCK_SIZE),
                                    Retry(), f"GET {key}")
            except StoreError as exc:
                report.problem(f"inode {ino}: tiered blocks {ext.file_block}+{ext.count} unreadable: {exc}")
                continue
            bad = first_bad_block(data, ext.checksums)
            if bad >= 0:
                report.problem(f"inode {ino}: tiered data fails its checksum at file block {ext.file_block + bad}")
            progress.advance(ext.count * BLOCK_SIZE)
    finally:
        progress.close()
    print(f"  {total >> 20} MiB of tiered data verified", flush=True)
