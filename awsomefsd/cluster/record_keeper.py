"""The leader keeps the device's founding record naming where the members listen.

A node that lost its state directory (or a new one with only the cluster token) reads the FOUNDED
record to find members to join through (awsomefsd/daemon/formation.py). The founder wrote its own
address there; once members come and go, and the founder itself may be gone, that address alone
may answer nothing. So the leader rewrites the record's addresses when the active members' change
(the same record otherwise: owner, CA fingerprint and its proof stay as the founder wrote them).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from awsomefsd.duty import DutyBook, run_duty
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.founding import MAX_SEEDS, Mode, read_founding, write_founding

log = logging.getLogger(__name__)
PERIOD_S = 5.0


class FoundingRecordKeeper:
    """A duty (awsomefsd/duty.py): `step` every PERIOD_S; it touches the device only when the
    leader's view of the members' addresses differs from what it last saw on the record."""

    def __init__(self, device_path: Path, addresses: Callable[[], list[str]], leads: Callable[[], bool]) -> None:
        self.device_path = device_path
        self.addresses = addresses
        self.leads = leads
        self._settled: tuple[str, ...] | None = None
        self.rewrites = 0

    async def step(self) -> float:
        if not self.leads():
            self._settled = None  # a later term reads the record afresh
            return PERIOD_S
        want = tuple(sorted(self.addresses()))[:MAX_SEEDS]
        if want and want != self._settled:
            await trio.to_thread.run_sync(self._rewrite, want)
            self._settled = want
        return PERIOD_S

    def _rewrite(self, want: tuple[str, ...]) -> None:
        with BlockDevice.open(self.device_path, shared=True) as device:
            record = read_founding(device)
            if record is None or not record.founded or record.mode != Mode.CLUSTER or record.seeds == want:
                return
            write_founding(device, replace(record, seeds=want))
        self.rewrites += 1
        log.info("the founding record on %s names the members at %s", self.device_path, ", ".join(want))


def keep_founding_record(nursery: trio.Nursery, device_path: Path, addresses: Callable[[], dict[int, str]],
                         raft: Any, book: DutyBook) -> FoundingRecordKeeper:
    """Start the keeper as a duty in `nursery`: `addresses()` the active members' (by node id),
    `raft.is_leader` whether this node leads."""
    keeper = FoundingRecordKeeper(device_path, lambda: list(addresses().values()), lambda: bool(raft.is_leader))
    nursery.start_soon(functools.partial(run_duty, "founding record", keeper.step, book=book, period_s=PERIOD_S))
    return keeper
