"""Tiering through a real mount when the object store is slow, hung, or wrong (issue 41): the
daemon is `awsomefsd dev --config FILE` with [tier] in that file, pointing at the S3 test server
through the fault-injecting proxy. Moving a file never holds up other requests, a hung store fails
a read after one `read_timeout_s` whatever the read path, and the commands say why in one line."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.fs.xattr_ops import TIER_XATTR
from tests.support.daemon import AWSOMEFSD, REPO, Daemon, run_cli, wait_for
from tests.support.s3 import TEST_KEY_ID, TEST_SECRET, FaultProxy, S3Server, fault_proxy

READ_TIMEOUT_S = 2.0
NOBODY = 65534


@pytest.fixture(scope="module")
def slow_proxy(s3: S3Server) -> Iterator[FaultProxy]:
    with fault_proxy(s3.endpoint) as running:
        yield running


def tier_config(path: Path, endpoint: str, bucket: str) -> Path:
    credentials = path.parent / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {TEST_KEY_ID}\naws_secret_access_key = {TEST_SECRET}\n")
    os.chmod(credentials, 0o600)
    path.write_text(f'[tier]\nendpoint = "{endpoint}"\nbucket = "{bucket}"\nprefix = "outages/"\n'
                    f'credentials_file = "{credentials}"\nobject_bytes = "1M"\nmemory_cache_bytes = 0\n'
                    f'cache_bytes = 0\nrecall_reads = 0\nread_timeout_s = {READ_TIMEOUT_S}\n')
    return path


@pytest.fixture(scope="module")
def daemon(slow_proxy: FaultProxy, s3: S3Server) -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-tier-outages-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    config = tier_config(base / "awsomefsd.toml", slow_proxy.endpoint, s3.bucket)
    clean = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}  # only the file configures it
    d = Daemon(base / "state", base / "mnt", size="1G", extra=["--config", str(config)], env=clean)
    d.config = config  # type: ignore[attr-defined]
    try:
        d.start()
        yield d
    finally:
        slow_proxy.clear()
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.logs()
        d.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def proxy(slow_proxy: FaultProxy) -> Iterator[FaultProxy]:
    slow_proxy.clear()
    yield slow_proxy
    slow_proxy.clear()


def placement(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(os.getxattr(path, TIER_XATTR.decode()))
    return state


def evicted_file(d: Daemon, name: str, size: int = 256 * 1024) -> Path:
    path = d.mount / name
    path.write_bytes(os.urandom(size))
    done = run_cli("tier", "evict", str(path))
    assert done.returncode == 0, done.stderr
    assert placement(path)["device_bytes"] == 0
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return path


def write_and_fsync(path: Path) -> float:
    started = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"w" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - started


def test_dev_reads_tier_settings_from_its_config_file(daemon: Daemon) -> None:
    assert "tiering cold data to ObjectStore(" in daemon.logs(), daemon.logs()
    assert "outages/" in daemon.logs()


@pytest.mark.parametrize("action", ["evict", "recall"])
def test_a_move_waiting_on_a_slow_store_holds_up_no_other_request(daemon: Daemon, proxy: FaultProxy,
                                                                   action: str) -> None:
    path = daemon.mount / f"moving-{action}"
    path.write_bytes(os.urandom(512 * 1024))
    if action == "recall":
        assert run_cli("tier", "evict", str(path)).returncode == 0
    delays = proxy.injected.get("delay", 0)
    # a recall's GET must answer within the read timeout; an evict's PUT may take longer
    proxy.plan("delay", times=1, method="PUT" if action == "evict" else "GET",
               delay_s=4.0 if action == "evict" else READ_TIMEOUT_S * 0.9)
    mover = subprocess.Popen([*AWSOMEFSD, "tier", action, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: proxy.injected.get("delay", 0) > delays, 20, "the move reached the store")
        took = write_and_fsync(daemon.mount / f"unrelated-{action}")
        listed = time.monotonic()
        assert f"moving-{action}" in os.listdir(daemon.mount)
        listed = time.monotonic() - listed
        assert mover.poll() is None, "the move should still wait for the store"
        assert took < 0.5 and listed < 0.5, (took, listed)
    finally:
        _, err = mover.communicate(timeout=60)
    assert mover.returncode == 0, err
    assert placement(path)["tiered_bytes" if action == "evict" else "device_bytes"] == 512 * 1024


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "O_DIRECT"])
def test_a_hung_store_fails_a_read_after_one_read_timeout(daemon: Daemon, proxy: FaultProxy, direct: bool) -> None:
    path = evicted_file(daemon, f"hung-{int(direct)}")
    proxy.plan("delay", times=100, method="GET", delay_s=30.0)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    started = time.monotonic()
    try:
        with pytest.raises(OSError) as failed:
            if direct:
                buffer = mmap.mmap(-1, 65536)
                os.preadv(fd, [buffer], 0)
            else:
                os.pread(fd, 65536, 0)
    finally:
        os.close(fd)
    took = time.monotonic() - started
    assert failed.value.errno == errno.EIO
    assert READ_TIMEOUT_S * 0.9 < took < READ_TIMEOUT_S * 1.5, took


def test_status_asks_the_store_and_says_when_it_does_not_answer(daemon: Daemon, proxy: FaultProxy) -> None:
    def status() -> dict[str, str]:
        text = run_cli("tier", "status", "--config", str(daemon.config), "--state",  # type: ignore[attr-defined]
                       str(daemon.state)).stdout
        return {line[:31].strip(): line[31:].strip() for line in text.splitlines()}

    assert status()["store reachable"] == "yes"
    proxy.plan("status", times=1000, status=503, code="ServiceUnavailable")
    reachable = status()["store reachable"]
    assert reachable.startswith("NO: ") and "503" in reachable, reachable
    overview = run_cli("status", "--config", str(daemon.config), "--state", str(daemon.state))  # type: ignore[attr-defined]
    assert "the object store does not answer: GET" in overview.stdout, overview.stdout + overview.stderr


def test_a_missing_bucket_is_named_by_status_and_by_evict(daemon: Daemon, s3: S3Server, proxy: FaultProxy,
                                                         tmp_path: Path) -> None:
    config = tier_config(tmp_path / "other.toml", s3.endpoint, "no-such-bucket-here")
    text = run_cli("tier", "status", "--config", str(config), "--state", str(daemon.state)).stdout
    assert "NoSuchBucket (no such bucket: bucket 'no-such-bucket-here')" in text, text
    path = daemon.mount / "bucketless"
    path.write_bytes(b"b" * 8192)
    # what the store answers a PUT into a bucket that is gone (the daemon's still holds objects)
    proxy.plan("status", times=1, method="PUT", status=404, code="NoSuchBucket")
    done = run_cli("tier", "evict", str(path))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "no such bucket: bucket 'awsomefs-test'" in done.stderr, done.stderr
    assert "Input/output error" not in done.stderr
    assert placement(path)["device_bytes"] == 8192


def test_tier_commands_without_root_say_root_is_needed(daemon: Daemon, tmp_path: Path) -> None:
    path = daemon.mount / "not-mine"
    with open(path, "wb") as f:
        f.write(b"n" * 8192)
        f.flush()
        os.fsync(f.fileno())  # on the device (a close may leave small data to the batch: fs/batch.py)
    os.chmod(path, 0o666)
    err = tmp_path / "stderr"
    err.touch()
    os.chmod(tmp_path, 0o777)
    os.chmod(err, 0o666)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 255
        try:
            fd = os.open(err, os.O_WRONLY)
            os.dup2(fd, 2)
            sys.stderr = os.fdopen(2, "w")
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            from awsomefsd.cli.tier import tier_move

            code = tier_move([path], "evict")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert err.read_text().strip() == (f"{path}: needs root (CAP_SYS_ADMIN): the kernel lets only root use "
                                       "trusted.* attributes")
    assert placement(path)["device_bytes"] == 8192


@pytest.mark.slow  # two daemon restarts
def test_a_node_without_tier_says_once_why_tiered_data_fails(daemon: Daemon) -> None:
    """Runs last: it restarts the module's daemon (without its configuration, then with it)."""
    path = evicted_file(daemon, "tiered-elsewhere")
    assert daemon.stop() == 0, daemon.logs()
    plain = Daemon(daemon.state, daemon.mount, size="1G", env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    plain.start()
    try:
        for _ in range(3):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            with pytest.raises(OSError) as failed:
                path.read_bytes()
            assert failed.value.errno == errno.EIO
        assert plain.stop() == 0, plain.logs()
    finally:
        plain.stop_hard()
        daemon.start()
    told = [line for line in plain.logs().splitlines() if "object store" in line or " ERROR " in line]
    assert len(told) == 1, told
    assert "this node has no [tier] configured" in told[0] and "EIO to read" in told[0], told
