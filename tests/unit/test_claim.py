"""The founding record and the claim of a device's founding (awsomefsd/io/founding.py, claim.py):
contenders that start together, as if on different machines (no turn-taking on this one), settle
on exactly one founder; a claim whose holder stops renewing is taken over; a torn record falls
back to its copy. Timings are shortened; the protocol is the daemon's."""

from __future__ import annotations

import os
import random
import threading
import uuid
from pathlib import Path

import pytest

from awsomefsd.io.claim import ClaimTiming, DeviceClaim, claim_founding
from awsomefsd.io.device import BlockDevice, create_image
from awsomefsd.io.founding import PRIMARY_BLOCK, FoundingRecord, Mode, Stage, read_founding, write_founding
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.io.superblock import format_device

FAST = ClaimTiming(settle_s=0.3, renew_s=0.1, expiry_s=1.0, read_to_write_s=0.05, poll_s=0.02)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "dev.img"
    create_image(path, 64 << 20)
    with BlockDevice.open(path) as device:
        format_device(device, cluster_id=uuid.uuid4())
    return path


def base_of(image: Path) -> FoundingRecord:
    with BlockDevice.open(image) as device:
        record = read_founding(device)
    assert record is not None and record.stage == Stage.FORMATTED
    return record


def race(image: Path, contenders: int, *, shared: bool, rng: random.Random, jitter_s: float = 0.02) -> list[FoundingRecord]:
    """Start `contenders` claims at once; each winner records FOUNDED under its own id. What each saw."""
    base = base_of(image)
    barrier = threading.Barrier(contenders)
    seen: list[FoundingRecord | None] = [None] * contenders
    jitter = [rng.random() * jitter_s for _ in range(contenders)]

    def contend(k: int) -> None:
        barrier.wait()
        threading.Event().wait(jitter[k])
        outcome = claim_founding(image, shared=shared, base=base, deadline_s=30, timing=FAST, machine_lock=False)
        if isinstance(outcome, DeviceClaim):
            founded = FoundingRecord(Stage.FOUNDED, base.cluster_id, base.device_id, Mode.SINGLE, owner=outcome.record.owner)
            threading.Event().wait(0.05)  # making the metadata
            outcome.found(founded)
            seen[k] = founded
        else:
            seen[k] = outcome

    threads = [threading.Thread(target=contend, args=(k,)) for k in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(record is not None for record in seen)
    return [record for record in seen if record is not None]


def test_contenders_on_different_machines_settle_on_one_founder(image: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    for _round in range(4):
        with BlockDevice.open(image) as device:
            format_device(device, cluster_id=uuid.uuid4(), force=True)
        seen = race(image, 4, shared=True, rng=rng)
        owners = {record.owner for record in seen}
        assert len(owners) == 1, f"seed {seed}: founders {owners}"
        with BlockDevice.open(image) as device:
            assert read_founding(device) == seen[0]


def test_without_the_settling_delay_two_contenders_both_claim(image: Path) -> None:
    """The planted bug the test above must catch: no wait-and-read-again (as for an image no other
    machine sees, where the machine's own lock takes its place). Two founders show up."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for _round in range(200):
        with BlockDevice.open(image) as device:
            format_device(device, cluster_id=uuid.uuid4(), force=True)
        if len({record.owner for record in race(image, 8, shared=False, rng=rng, jitter_s=0)}) > 1:
            return
    pytest.fail("200 rounds without the delay never produced two founders: the race test would not notice")


def test_a_claim_whose_holder_stopped_renewing_is_taken_over(image: Path) -> None:
    base = base_of(image)
    first = claim_founding(image, shared=True, base=base, deadline_s=5, timing=FAST, machine_lock=False)
    assert isinstance(first, DeviceClaim)
    first._halt()  # the holder died mid-founding: its claim stays on the device, unrenewed
    waited: list[FoundingRecord] = []
    second = claim_founding(image, shared=True, base=base, deadline_s=10, timing=FAST, machine_lock=False,
                            on_wait=waited.append)
    assert isinstance(second, DeviceClaim) and second.record.owner != first.record.owner
    assert [w.owner for w in waited] == [first.record.owner]
    second.release(base)
    first.release(None)


def test_a_torn_primary_record_falls_back_to_its_copy(image: Path) -> None:
    base = base_of(image)
    founded = FoundingRecord(Stage.FOUNDED, base.cluster_id, base.device_id, Mode.CLUSTER, owner=uuid.uuid4(),
                             host="h", state_dir="/s", seeds=("10.0.0.1:7470", "[fd00::1]:7470"),
                             ca_fingerprint=os.urandom(32), proof=os.urandom(32))
    with BlockDevice.open(image) as device:
        write_founding(device, founded)
        assert read_founding(device) == founded
        torn = bytearray(founded.encode())
        torn[100] ^= 0xFF
        device.write(PRIMARY_BLOCK * BLOCK_SIZE, bytes(torn))
        assert read_founding(device) == founded
        assert FoundingRecord.decode(bytes(BLOCK_SIZE)) is None
