"""The descriptor keeper (`awsomefsd fd-keeper`) is restarted under a serving daemon: an update of
its DaemonSet does nothing else, and an OOM kill does the same. A restarted keeper holds nothing,
so the daemon gives it the mount's descriptor again; a daemon started before its keeper does so
once it appears; and a hand-over is refused, the daemon serving on, while no keeper holds the
mount (letting go of the descriptor then would abort the mount under every application).

Real processes throughout: the keeper, the daemons, a writer, a reader and a shell in the mount
(tests/support/apps.py), and `awsomefsd hand-over` as an operator or a preStop hook runs it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.apps import (
    LINES,
    Lines,
    Reader,
    expected,
    shell_run,
    start_shell,
    start_writer,
    write_durably,
)
from tests.support.daemon import AWSOMEFSD, REPO, Daemon, is_mounted, run_cli, wait_for

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
]

EXIT_HANDED_OVER = 75


@dataclass
class Keeper:
    """`awsomefsd fd-keeper` on one socket, started, killed and started again as its pod would be."""

    socket: Path
    log: Path
    proc: subprocess.Popen[str] | None = None
    starts: int = field(default=0)

    def start(self) -> Keeper:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([*AWSOMEFSD, "fd-keeper", "--socket", str(self.socket)],
                                         stdout=subprocess.PIPE, stderr=log, text=True, cwd="/",
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("awsomefsd: keeping descriptors on"), "the keeper did not start"
        self.starts += 1
        return self

    def kill(self) -> None:
        """SIGKILL, as the OOM killer does (a pod's replacement ends it with SIGTERM: the same here)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def keeps(self, count: int) -> bool:
        """Has the keeper said `count` times that it keeps a mount (once per start that got it)?"""
        return self.log.read_text().count("keeping fuse-") >= count

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@dataclass
class Setup:
    base: Path
    keeper: Keeper
    env: dict[str, str]

    def daemon(self) -> Daemon:
        return Daemon(self.base / "state", self.base / "mnt", size="1G", env=self.env)

    def hand_over(self) -> subprocess.CompletedProcess[str]:
        return run_cli("hand-over", "--state", str(self.base / "state"), timeout_s=60)


@pytest.fixture
def setup() -> Iterator[Setup]:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-keeper-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    keeper = Keeper(base / "keeper.sock", base / "keeper.log")
    try:
        yield Setup(base, keeper, {"AWSOMEFS_MOUNT__FD_KEEPER": str(keeper.socket),
                                   "AWSOMEFS_MOUNT__TRANSPORT": "kernel"})
    finally:
        keeper.stop()
        subprocess.run(["umount", "-l", str(base / "mnt")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_after_the_keeper_restarts_a_hand_over_keeps_every_application_working(setup: Setup) -> None:
    setup.keeper.start()
    first = setup.daemon().start()
    second = None
    try:
        wait_for(lambda: setup.keeper.keeps(1), 10, "the keeper to hold the mount")
        work = first.mount / "work"
        work.mkdir()
        (work / "read-me").write_bytes(b"r" * 50_000)
        reader = Reader(work / "read-me")
        shell = start_shell(work)
        writer = start_writer(work / "log", sync_at=LINES)
        wait_for(lambda: writer.wrote() >= LINES // 8, 60, "the writer to be under way")

        setup.keeper.kill()
        setup.keeper.start()  # a new keeper pod: it holds nothing until the daemon gives it the mount
        done = setup.hand_over()
        assert done.returncode == 0, done.stderr
        assert first.proc is not None and first.proc.wait(30) == EXIT_HANDED_OVER, first.logs()
        second = setup.daemon().start()
        assert "continuing the mount" in second.logs(), second.logs()

        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 120, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        last = next(line for line in writer.lines if line.startswith("done"))
        assert last.endswith("[]"), f"no error after the hand-over: {last}"
        assert (work / "log").read_bytes() == expected(LINES)
        assert reader.read_size() == 50_000
        reader.close()
        assert shell_run(shell, "echo after > after && cat after") == ["after"]
        shell.stdin.close()  # type: ignore[union-attr]
        assert shell.wait(30) == 0
        assert second.stop() == 0, second.logs()
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()


def test_a_restarted_keeper_is_given_the_mount_so_it_outlives_a_crash(setup: Setup) -> None:
    """Without a hand-over to give it the descriptor: the daemon sees the keeper go and come back."""
    setup.keeper.start()
    first = setup.daemon().start()
    second = None
    try:
        wait_for(lambda: setup.keeper.keeps(1), 10, "the keeper to hold the mount")
        setup.keeper.kill()
        setup.keeper.start()
        wait_for(lambda: setup.keeper.keeps(2), 10, "the daemon to give the new keeper the mount")
        write_durably(first.mount / "synced", b"before the crash")
        first.kill()
        assert is_mounted(first.mount)
        second = setup.daemon().start()
        assert "continuing the mount" in second.logs() and "crash" in second.logs(), second.logs()
        assert (second.mount / "synced").read_bytes() == b"before the crash"
        assert second.stop() == 0, second.logs()
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()


def test_a_daemon_started_before_its_keeper_registers_once_the_keeper_appears(setup: Setup) -> None:
    first = setup.daemon().start()  # no keeper listens yet: the mount is served all the same
    second = None
    try:
        (first.mount / "early").write_text("written before the keeper")
        setup.keeper.start()
        wait_for(lambda: setup.keeper.keeps(1), 10, "the daemon to give the keeper the mount")
        writer = start_writer(first.mount / "log", sync_at=LINES, lines=LINES // 4)
        done = setup.hand_over()
        assert done.returncode == 0, done.stderr
        assert first.proc is not None and first.proc.wait(30) == EXIT_HANDED_OVER, first.logs()
        second = setup.daemon().start()
        assert "continuing the mount" in second.logs(), second.logs()
        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 60, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        assert (second.mount / "log").read_bytes() == expected(LINES // 4)
        assert (second.mount / "early").read_text() == "written before the keeper"
        assert second.stop() == 0, second.logs()
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()


def test_a_hand_over_no_keeper_holds_is_refused_and_the_mount_keeps_working(setup: Setup) -> None:
    setup.keeper.start()
    daemon = setup.daemon().start()
    try:
        wait_for(lambda: setup.keeper.keeps(1), 10, "the keeper to hold the mount")
        writer = start_writer(daemon.mount / "log", sync_at=LINES, lines=LINES // 4)
        setup.keeper.kill()  # and not started again
        started = time.monotonic()
        done = setup.hand_over()
        assert done.returncode == 1, (done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "did not hand the mount over" in lines[0] and "keeper" in lines[0], lines
        assert time.monotonic() - started < 10, "refused at once, not after the command's deadline"
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon serves on"
        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 60, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        assert (daemon.mount / "log").read_bytes() == expected(LINES // 4)
        (daemon.mount / "after").write_text("still served")
        assert (daemon.mount / "after").read_text() == "still served"
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.stop_hard()


KEEPER_THAT_DIES = r"""
import os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(sys.argv[1])
listener.listen(8)
print("listening", flush=True)
kept = []
serial = 0
while serial < 3:  # the hold at mount, the daemon's watch, the hand-over's first check
    conn, _ = listener.accept()
    message, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
    kept.append(conn)
    kept.extend(fds)
    verb, name, *device = message.decode().split(" ")
    if verb != "HOLD":  # the daemon's FETCH at start: nothing kept
        conn.send(b"NONE")
        continue
    conn.send(f"HELD {name} {device[0]}".encode())
    serial += 1
    print("held", serial, flush=True)
os._exit(0)  # gone right after confirming, while the daemon drains its requests
"""


def test_a_keeper_gone_while_the_requests_drain_calls_the_hand_over_off(setup: Setup) -> None:
    """The keeper confirms it holds the mount and then dies before the daemon lets go of its own
    descriptor: the daemon asks once more at that point, serves on, and says why."""
    keeper = subprocess.Popen([sys.executable, "-c", KEEPER_THAT_DIES, str(setup.keeper.socket)],
                              stdout=subprocess.PIPE, text=True, cwd="/")
    said = Lines(keeper)
    wait_for(lambda: said.has("listening"), 10, "the keeper to listen")
    daemon = setup.daemon().start()
    try:
        wait_for(lambda: said.has("held 2"), 10, "the daemon's watch of the keeper")
        writer = start_writer(daemon.mount / "log", sync_at=LINES, lines=LINES // 4)
        done = setup.hand_over()
        assert keeper.wait(10) == 0 and said.has("held 3"), said.lines
        assert done.returncode == 1 and "did not hand the mount over" in done.stderr, (done.stdout, done.stderr)
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon serves on"
        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 60, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        assert (daemon.mount / "log").read_bytes() == expected(LINES // 4)

        setup.keeper.start()  # a real keeper again: the hand-over goes ahead
        wait_for(lambda: setup.keeper.keeps(1), 10, "the daemon to give the keeper the mount")
        again = setup.hand_over()
        assert again.returncode == 0, again.stderr
        assert daemon.proc.wait(30) == EXIT_HANDED_OVER
        second = setup.daemon().start()
        try:
            assert (second.mount / "log").read_bytes() == expected(LINES // 4)
            assert second.stop() == 0, second.logs()
        finally:
            second.stop_hard()
    finally:
        if keeper.poll() is None:
            keeper.kill()
        daemon.stop_hard()
