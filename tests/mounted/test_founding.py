"""A device knows whose metadata describes it (design note 53): a daemon or fsck with a state
directory that holds none never makes metadata over a file system that exists, and says in one
line where it is; of two daemons started at once on a fresh image, exactly one makes it. Real
daemons (`awsomefsd run`) on an image file, as an operator starts them."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from awsomefsd.io.device import BlockDevice
from awsomefsd.io.founding import COPY_BLOCK, PRIMARY_BLOCK, Mode, read_founding
from awsomefsd.io.layout import BLOCK_SIZE
from tests.support.daemon import AWSOMEFSD, Daemon, run_cli
from tests.support.ports import free_port

pytestmark = pytest.mark.mounted


class RunDaemon(Daemon):
    """`awsomefsd run` on a given device and state directory (the packaged way to start a node)."""

    def __init__(self, device: Path, state: Path, mount: Path) -> None:
        super().__init__(state, mount)
        self.device = device

    def command(self) -> list[str]:
        return [*self.prefix, *AWSOMEFSD, "run", "--device", str(self.device), "--state", str(self.state), "--mount",
                str(self.mount), "--metrics-port", "-1"]


def run_once(device: Path, state: Path, mount: Path) -> subprocess.CompletedProcess[str]:
    """A start that is expected to be refused: its exit status and output."""
    mount.mkdir(exist_ok=True)
    return run_cli("run", "--device", str(device), "--state", str(state), "--mount", str(mount), "--metrics-port", "-1",
                   timeout_s=60)


def image_digest(image: Path) -> str:
    return hashlib.sha256(image.read_bytes()).hexdigest()


def one_line_refusal(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("awsomefsd: error: "), proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "shared.img"
    out = run_cli("format", str(path), "--size", "256M")
    assert out.returncode == 0, out.stderr
    return path


def test_an_empty_state_directory_never_makes_metadata_over_a_file_system(image: Path, tmp_path: Path) -> None:
    first, fresh, mount = tmp_path / "state-a", tmp_path / "state-b", tmp_path / "mnt"
    mount.mkdir()
    payload = random.randbytes(1 << 20)
    daemon = RunDaemon(image, first, mount).start()
    (mount / "report.bin").write_bytes(payload)
    daemon.stop()
    before = image_digest(image)

    line = one_line_refusal(run_once(image, fresh, mount), str(first), "format --force")
    assert "has none" in line
    fsck = run_cli("fsck", "--device", str(image), "--state", str(fresh))
    one_line_refusal(fsck, str(fresh), str(first))
    assert image_digest(image) == before, "a refused start or fsck wrote to the device"

    daemon = RunDaemon(image, first, mount).start()
    assert hashlib.sha256((mount / "report.bin").read_bytes()).digest() == hashlib.sha256(payload).digest()
    daemon.stop()
    check = run_cli("fsck", "--device", str(image), "--state", str(first), "--verify-data")
    assert check.returncode == 0 and "fsck: clean" in check.stdout, check.stdout + check.stderr


def test_two_daemons_started_at_once_on_a_fresh_image_make_the_metadata_once(image: Path, tmp_path: Path) -> None:
    states = [tmp_path / "state-a", tmp_path / "state-b"]
    mounts = [tmp_path / "mnt-a", tmp_path / "mnt-b"]
    for mount in mounts:
        mount.mkdir()
    barrier = threading.Barrier(2)
    daemons = [RunDaemon(image, state, mount) for state, mount in zip(states, mounts)]
    outcomes: list[BaseException | None] = [None, None]

    def start(k: int) -> None:
        barrier.wait()
        try:
            daemons[k].start()
        except BaseException as exc:
            outcomes[k] = exc

    threads = [threading.Thread(target=start, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    served = [k for k in range(2) if outcomes[k] is None]
    assert len(served) == 1, [d.logs() for d in daemons]
    refused = daemons[1 - served[0]]
    assert "already holds a file system" in refused.logs()
    assert str(states[served[0]]) in refused.logs()
    (mounts[served[0]] / "f").write_bytes(b"kept")
    daemons[served[0]].stop()
    with BlockDevice.open(image) as device:
        record = read_founding(device)
    assert record is not None and record.founded and record.mode == Mode.SINGLE
    assert record.state_dir == str(states[served[0]])


def test_a_device_formatted_before_the_record_waits_for_its_own_metadata(image: Path, tmp_path: Path) -> None:
    """A device from an older build has no founding record: an empty state directory is refused
    (its metadata may exist somewhere), and the state that holds it records it on first start."""
    own, other, mount = tmp_path / "state-own", tmp_path / "state-other", tmp_path / "mnt"
    mount.mkdir()
    RunDaemon(image, own, mount).start().stop()
    fd = os.open(image, os.O_RDWR)
    try:
        for block in (PRIMARY_BLOCK, COPY_BLOCK):
            os.pwrite(fd, bytes(BLOCK_SIZE), block * BLOCK_SIZE)
    finally:
        os.close(fd)
    one_line_refusal(run_once(image, other, mount), "kept no record", "format --force")
    RunDaemon(image, own, mount).start().stop()
    with BlockDevice.open(image) as device:
        record = read_founding(device)
    assert record is not None and record.founded and record.state_dir == str(own)
    one_line_refusal(run_once(image, other, mount), str(own))


def test_a_cluster_token_for_another_cluster_is_refused_and_the_device_unchanged(image: Path, tmp_path: Path) -> None:
    own, mount = tmp_path / "state-own", tmp_path / "mnt"
    mount.mkdir()
    RunDaemon(image, own, mount).start().stop()
    before = image_digest(image)
    token = run_cli("token", "new").stdout.strip()
    port = free_port()
    proc = run_cli("run", "--device", str(image), "--state", str(tmp_path / "state-new"), "--mount", str(mount),
                   "--listen", f"127.0.0.1:{port}", "--metrics-port", "-1", env={"AWSOMEFS_CLUSTER__TOKEN": token})
    one_line_refusal(proc, "the cluster token is for cluster")
    joined = run_cli("join", token, "--device", str(image), "--state", str(tmp_path / "state-join"), "--mount",
                     str(mount), "--listen", f"127.0.0.1:{port}", "--metrics-port", "-1")
    one_line_refusal(joined)
    assert image_digest(image) == before
