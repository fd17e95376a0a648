"""The command line as an operator uses it: `run` from a TOML file and the environment, `status`,
`--help` and `--version`, and the Prometheus endpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd import __version__
from tests.support.daemon import AWSOMEFSD, REPO, is_mounted, run_cli, wait_for

pytestmark = pytest.mark.mounted


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="awsomefs-cli-", dir="/var/tmp"))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path / "mnt")], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_version_and_help() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"awsomefsd {__version__}"
    for command in ("dev", "run", "format", "fsck", "status", "self-test"):
        r = run_cli(command, "--help")
        assert r.returncode == 0 and "usage: awsomefsd" in r.stdout, command


def test_run_from_config_file_and_environment(base: Path) -> None:
    img = base / "dev.img"
    assert run_cli("format", str(img), "--size", "256M").returncode == 0
    config = base / "awsomefsd.toml"
    config.write_text(
        f'[node]\nstate_dir = "{base / "state"}"\nname = "node-a"\n'
        f'[device]\npath = "{img}"\n'
        f'[mount]\npath = "{base / "wrong"}"\n'
        '[metrics]\nenabled = true\nport = 0\n'
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWSOMEFS_MOUNT__PATH": str(base / "mnt")}
    proc = subprocess.Popen([*AWSOMEFSD, "run", "--config", str(config)], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True).start()
    try:
        wait_for(lambda: any("awsomefsd: mounted" in line for line in lines), 60, "the mount")
        assert is_mounted(base / "mnt"), "the environment overrides the file"
        (base / "mnt" / "hello").write_text("world")

        status = run_cli("status", "--config", str(config), "--json")
        info = json.loads(status.stdout)
        assert status.returncode == 0, status.stdout
        assert info["node"] == "node-a" and info["daemon_running"] is True
        assert str(base / "mnt") in info["mounts"]
        assert info["device"]["size_bytes"] == 256 << 20 and info["healthy"] is True
        table = run_cli("status", "--config", str(config)).stdout
        assert "node-a (running" in table and "health" in table and "OK" in table

        port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/", "".join(lines)).group(1))  # type: ignore[union-attr]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for name in ("awsomefs_fuse_request_seconds_bucket", "awsomefs_device_written_bytes_total",
                     "awsomefs_checksum_failures_total", "awsomefs_free_blocks", "awsomefs_meta_commit_batch_commands"):
            assert name in body, name
        assert re.search(r'awsomefs_fuse_request_seconds_count\{op="create"\} [1-9]', body)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
    assert not is_mounted(base / "mnt")
    stopped = json.loads(run_cli("status", "--config", str(config), "--json").stdout)
    assert stopped["daemon_running"] is False and stopped["metadata"]["inodes"] >= 4


def test_run_without_device_is_a_clear_error(base: Path) -> None:
    config = base / "c.toml"
    config.write_text(f'[node]\nstate_dir = "{base / "state"}"\n[mount]\npath = "{base / "mnt"}"\n')
    r = run_cli("run", "--config", str(config), "--metrics-port", "-1")  # the default port may be taken
    assert r.returncode == 1 and "no device configured" in r.stderr


def test_bad_settings_are_reported(base: Path) -> None:
    config = base / "c.toml"
    config.write_text("[metrics]\nport = 99999\n")
    r = run_cli("status", "--config", str(config))
    assert r.returncode == 1 and "invalid settings" in r.stderr and "port" in r.stderr
    r = run_cli("status", "--config", str(base / "missing.toml"))
    assert r.returncode == 1 and "not found" in r.stderr


def test_a_second_ctrl_c_does_not_interrupt_the_clean_stop(base: Path) -> None:
    """Ctrl-C in a terminal reaches the compiled onefile bootstrap and the daemon, and the bootstrap
    passes it on again; impatient users press it twice; systemd sends SIGTERM. Once a clean stop
    has begun it finishes: the buffered data is flushed, no traceback, exit 0."""
    from tests.support.daemon import Daemon

    daemon = Daemon(base / "state", base / "mnt", env={"AWSOMEFS_DATA__FLUSH_INTERVAL_MS": "60000"}).start()
    try:
        payload = os.urandom(8 << 20)
        (base / "mnt" / "unsynced").write_bytes(payload)  # buffered: no fsync, no flush before a minute
        assert daemon.proc is not None
        for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            daemon.proc.send_signal(sig)
        assert daemon.proc.wait(60) == 0, daemon.logs()
        assert "Traceback" not in daemon.logs() and "KeyboardInterrupt" not in daemon.logs(), daemon.logs()
        wait_for(lambda: not is_mounted(base / "mnt"), 10, "unmount")
        daemon.start()
        assert (base / "mnt" / "unsynced").read_bytes() == payload
        assert daemon.stop() == 0
    finally:
        daemon.stop_hard()
