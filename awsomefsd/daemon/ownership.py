"""Whose metadata a device belongs to, settled before a node serves it (design note 53).

A node with no metadata in its state directory must never make fresh metadata for a device that
already holds a file system: it would hand out blocks that hold other files. The device's founding
record (awsomefsd/io/founding.py) says whether metadata exists and where: this module reads it at
start-up, makes the metadata only under a claim of the founding (awsomefsd/io/claim.py), and
otherwise refuses with one line that names the metadata's keeper and what to do.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from awsomefsd.io.claim import ClaimLost, DeviceClaim, claim_founding
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.errors import DeviceError
from awsomefsd.io.founding import FoundingRecord, Mode, Stage, read_founding, write_founding
from awsomefsd.io.superblock import Superblock
from awsomefsd.meta.bootstrap import adopt_metadata_id, discard_metadata, initialise_metadata, stored_identity
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore

log = logging.getLogger(__name__)
CLAIM_DEADLINE_S = 120.0


class OwnershipError(DeviceError):
    """This state directory may not serve this device; the message says whose it is and what to do."""


def may_be_shared(device: BlockDevice, shared: bool) -> bool:
    """Could another machine see this device? Then a claim waits out its settling delay. A block
    device may always be a LUN other machines see; an image file only when configured shared."""
    return shared or device.is_block_device


def refusal(path: Path, state_dir: Path, record: FoundingRecord) -> str:
    """The one line for a node that has no metadata of a device whose file system exists."""
    head = (f"{path} already holds a file system (cluster {record.cluster_id}) whose metadata is with "
            f"{record.describe()}; this state directory ({state_dir}) has none")
    if record.mode == Mode.CLUSTER:
        return (f"{head}: join the cluster with its token ([cluster] token, or `awsomefsd join TOKEN`), or run "
                f"`awsomefsd format --force {path}` to start over (every file on it is lost)")
    return (f"{head}: start awsomefsd with --state {record.state_dir or '<that directory>'} on {record.host or 'that host'}, "
            f"or run `awsomefsd format --force {path}` to start over (every file on it is lost)")


def legacy_refusal(path: Path, state_dir: Path) -> str:
    return (f"{path} was formatted by an awsomefsd that kept no record of its metadata, and this state directory "
            f"({state_dir}) has none: start awsomefsd with the state directory that holds it (that records it on the "
            f"device), or, if {path} holds nothing you need, run `awsomefsd format --force {path}`")


def host_name() -> str:
    return socket.gethostname()


def settle_single_node(device: BlockDevice, sb: Superblock, store: MetaStore, sm: StateMachine, *, state_dir: Path,
                       shared: bool, grant_all_to: int) -> bool:
    """A single node's metadata for `device`: checked against the record, or made under a claim
    when the device has none yet. True when it was made now."""
    record = read_founding(device)
    if stored_identity(store) is None:
        _found_single(device, sb, store, sm, record, state_dir=state_dir, shared=shared, grant_all_to=grant_all_to)
        return True
    mine = adopt_metadata_id(store)
    if record is not None and record.founded:
        if record.mode == Mode.CLUSTER:
            raise OwnershipError(f"{device.path} belongs to the cluster {record.cluster_id}; the metadata in {state_dir} "
                                 "is a single node's: start this node as a cluster member, or point --state elsewhere")
        if record.owner != mine:
            raise OwnershipError(
                f"{device.path}'s file system was made with other metadata ({record.describe()}); the metadata in "
                f"{state_dir} is a different copy: serving both would overwrite each other's files. Start awsomefsd "
                f"with that state directory, or run `awsomefsd format --force {device.path}` to start over")
        return False
    # Metadata from before the record existed (or a crash between making it and recording it).
    log.info("recording on %s that its metadata is in %s", device.path, state_dir)
    write_founding(device, _founded_single(sb, mine, state_dir))
    return False


def _founded_single(sb: Superblock, metadata_id: uuid.UUID, state_dir: Path) -> FoundingRecord:
    return FoundingRecord(Stage.FOUNDED, sb.cluster_id, sb.device_id, Mode.SINGLE, owner=metadata_id,
                          written_ns=time.time_ns(), host=host_name()[:255], state_dir=str(state_dir)[:1024])


def _found_single(device: BlockDevice, sb: Superblock, store: MetaStore, sm: StateMachine,
                  record: FoundingRecord | None, *, state_dir: Path, shared: bool, grant_all_to: int) -> None:
    if record is None:
        raise OwnershipError(legacy_refusal(device.path, state_dir))
    if record.founded:
        raise OwnershipError(refusal(device.path, state_dir, record))
    base = FoundingRecord(Stage.FORMATTED, sb.cluster_id, sb.device_id, host=host_name()[:255],
                          state_dir=str(state_dir)[:1024])
    outcome = claim_founding(device.path, shared=may_be_shared(device, shared), base=base,
                             deadline_s=CLAIM_DEADLINE_S,
                             on_wait=lambda other: log.info("%s: host %s is making this file system's metadata; "
                                                            "waiting", device.path, other.host or "?"))
    if isinstance(outcome, FoundingRecord):
        raise OwnershipError(refusal(device.path, state_dir, outcome))
    make_metadata_under(outcome, store, lambda: _initialise(store, sm, sb, grant_all_to),
                        lambda metadata_id: _founded_single(sb, metadata_id, state_dir), back_to=record)
    log.info("initialised metadata for cluster %s", sb.cluster_id)


def _initialise(store: MetaStore, sm: StateMachine, sb: Superblock, grant_all_to: int | None) -> uuid.UUID:
    layout = sb.layout
    initialise_metadata(store, sm, cluster_id=str(sb.cluster_id), device_id=str(sb.device_id),
                        data_extent=(layout.data_start_block, layout.data_blocks), now_ns=time.time_ns(),
                        groups_to=grant_all_to, group_count=layout.ag_count)
    return adopt_metadata_id(store)


def make_metadata_under(claim: DeviceClaim, store: MetaStore, make: Callable[[], uuid.UUID],
                        founded: Callable[[uuid.UUID], FoundingRecord], *, back_to: FoundingRecord) -> None:
    """Make the metadata while holding `claim`, then record it FOUNDED. A failure before the record
    gives the claim back; a claim lost at the last check discards what was made (nothing was served)."""
    try:
        made = make()
    except BaseException:
        claim.release(back_to)
        raise
    try:
        claim.found(founded(made))
    except ClaimLost:
        discard_metadata(store)
        raise


def initialise_founder_store(store: MetaStore, sm: StateMachine, sb: Superblock) -> None:
    """A cluster founder's first state (its groups are granted through Raft afterwards)."""
    _initialise(store, sm, sb, None)


def founded_cluster(sb: Superblock, *, owner: uuid.UUID, seeds: tuple[str, ...], ca_fingerprint: bytes,
                    proof: bytes) -> FoundingRecord:
    return FoundingRecord(Stage.FOUNDED, sb.cluster_id, sb.device_id, Mode.CLUSTER, owner=owner,
                          written_ns=time.time_ns(), host=host_name()[:255], seeds=seeds[:16],
                          ca_fingerprint=ca_fingerprint, proof=proof)


def check_member(device: BlockDevice, state_dir: Path) -> FoundingRecord | None:
    """A cluster member with metadata: the device must not be a single node's. The record, if any."""
    record = read_founding(device)
    if record is not None and record.founded and record.mode == Mode.SINGLE:
        raise OwnershipError(f"{device.path} holds a single node's file system ({record.describe()}); the state in "
                             f"{state_dir} is a cluster member's: check the device path")
    return record


__all__ = ["OwnershipError", "check_member", "founded_cluster", "initialise_founder_store", "make_metadata_under",
           "may_be_shared", "refusal", "settle_single_node"]
