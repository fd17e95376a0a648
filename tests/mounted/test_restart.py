"""Mounts survive the daemon: a hand-over (SIGUSR2, what `systemctl reload` and a package upgrade
send) and a crash (SIGKILL), with the mount's descriptor kept by `awsomefsd fd-keeper` (what
systemd's file descriptor store does for the unit; systemd itself does not run here).

While the daemon is replaced, real processes keep working through it: a writer and a reader with
descriptors opened before, and a shell whose working directory is inside the mount. Every byte
the writer was told is written (after a hand-over) or synced (after a crash) is checked.

The test process itself holds nothing open in the mount: it starts the next daemon, and a fork
closes inherited descriptors, each close a FLUSH that waits for a daemon (as it would for any
process that forks while the mount has none)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.apps import (
    LINE,
    LINES,
    Lines,
    Reader,
    expected,
    shell_run,
    start_shell,
    start_writer,
    write_durably,
)
from tests.support.daemon import AWSOMEFSD, REPO, Daemon, is_mounted, wait_for

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
]

EXIT_HANDED_OVER = 75
KERNEL = {"AWSOMEFS_MOUNT__TRANSPORT": "kernel"}  # only our transport hands mounts over (CI also runs
# this directory on the pyfuse3 fallback)


def read_uncached(path: Path) -> bytes:
    """The file as the daemon has it: the kernel's cached pages of it are dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.read(fd, os.fstat(fd).st_size + 1)
    finally:
        os.close(fd)


@dataclass
class Rig:
    base: Path
    keeper_socket: Path
    keeper: subprocess.Popen[str]
    env: dict[str, str]

    def daemon(self, extra: list[str] | None = None) -> Daemon:
        return Daemon(self.base / "state", self.base / "mnt", size="2G", env=self.env, extra=extra)


@pytest.fixture
def rig() -> Iterator[Rig]:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-restart-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    socket_path = base / "keeper.sock"
    with open(base / "keeper.log", "w") as keeper_log:
        keeper = subprocess.Popen([*AWSOMEFSD, "fd-keeper", "--socket", str(socket_path)], stdout=subprocess.PIPE,
                                  stderr=keeper_log, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
    assert keeper.stdout is not None
    assert keeper.stdout.readline().startswith("awsomefsd: keeping descriptors on"), "the keeper did not start"
    try:
        yield Rig(base, socket_path, keeper, {"AWSOMEFS_MOUNT__FD_KEEPER": str(socket_path), **KERNEL})
    finally:
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(30)
        subprocess.run(["umount", "-l", str(base / "mnt")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_a_hand_over_keeps_descriptors_working_directories_and_every_byte(rig: Rig) -> None:
    first = rig.daemon().start()
    second = None
    try:
        work = first.mount / "work"
        work.mkdir()
        (work / "read-me").write_bytes(b"r" * 100_000)
        reader = Reader(work / "read-me")
        shell = start_shell(work)
        assert shell_run(shell, "echo hello > from-shell && cat from-shell") == ["hello"]
        writer = start_writer(work / "log", sync_at=LINES)  # no sync before the end: a hand-over loses nothing
        wait_for(lambda: writer.wrote() >= LINES // 4, 60, "the writer to be under way")

        first.proc.send_signal(signal.SIGUSR2)  # type: ignore[union-attr]
        assert first.proc.wait(60) == EXIT_HANDED_OVER, first.logs()  # type: ignore[union-attr]
        assert is_mounted(first.mount), "a hand-over leaves the mount in place"
        second = rig.daemon().start()
        assert "continuing the mount" in second.logs() and "handed over" in second.logs(), second.logs()

        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 120, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        done = next(line for line in writer.lines if line.startswith("done"))
        assert done.endswith("[]"), f"no fsync error after a hand-over: {done}"
        assert (work / "log").read_bytes() == expected(LINES)
        assert reader.read_size() == 100_000, "a descriptor opened before reads on"
        reader.close()
        assert shell_run(shell, "cat from-shell && ls") == ["hello", "from-shell", "log", "read-me"]
        shell.stdin.close()  # type: ignore[union-attr]
        assert shell.wait(30) == 0
        worst = float(done.split()[1])
        print(f"longest write during the hand-over: {worst * 1000:.0f} ms")

        assert second.stop() == 0, second.logs()
        assert not is_mounted(second.mount)
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()


def test_a_successor_started_first_takes_the_mount_over_and_no_request_fails(rig: Rig) -> None:
    """`--take-over`: the next daemon loads while the old one serves, then has it hand over
    (issue 41 item 5). A writer and a reader go on through it: no write, fsync or read fails,
    every byte arrives, and the old daemon leaves as after any hand-over."""
    first = rig.daemon().start()
    second = None
    try:
        work = first.mount / "work"
        work.mkdir()
        (work / "read-me").write_bytes(b"r" * 100_000)
        reader = Reader(work / "read-me")
        writer = start_writer(work / "log", sync_at=LINES)
        wait_for(lambda: writer.wrote() >= LINES // 4, 60, "the writer to be under way")

        second = Daemon(rig.base / "state", rig.base / "mnt", size="2G", env=rig.env, extra=["--take-over"]).start()
        assert first.proc.wait(60) == EXIT_HANDED_OVER, first.logs()  # type: ignore[union-attr]
        assert "taking over from pid" in second.logs() and "continuing the mount" in second.logs(), second.logs()
        assert reader.read_size() == 100_000, "a descriptor opened before reads on"

        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 120, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        done = next(line for line in writer.lines if line.startswith("done"))
        assert done.endswith("[]"), f"no fsync error after a take-over: {done}"
        assert (work / "log").read_bytes() == expected(LINES)
        reader.close()
        assert second.stop() == 0, second.logs()
        assert not is_mounted(second.mount)
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()


def test_a_successor_the_daemon_refuses_leaves_with_one_line_and_the_daemon_serves() -> None:
    """Without a keeper the daemon cannot hand over: the successor says why in one line and exits,
    and the daemon still serves its mount."""
    base = Path(tempfile.mkdtemp(prefix="awsomefs-restart-", dir="/var/tmp"))
    daemon = Daemon(base / "state", base / "mnt", size="1G", env=KERNEL).start()
    try:
        successor = Daemon(base / "state", base / "mnt", size="1G", env=KERNEL, extra=["--take-over"])
        done = subprocess.run(successor.command(), capture_output=True, text=True, env=successor.env, cwd="/",
                              timeout=120)
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1 and "did not hand the mount over" in done.stderr, done.stderr
        assert "no descriptor store" in done.stderr, done.stderr
        (daemon.mount / "still").write_text("served")
        assert (daemon.mount / "still").read_text() == "served"
        assert daemon.stop() == 0
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


def test_a_daemon_serves_at_the_priority_it_was_given(rig: Rig) -> None:
    """A start runs ahead of the load (awsomefsd/priority.py), serving does not: once it serves,
    every thread of the daemon, and the autogroup of the session it leads (as a service does),
    are back where they were."""
    def nice_values(pid: int) -> set[int]:
        return {int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()[16])
                for tid in os.listdir(f"/proc/{pid}/task")}

    daemon = Daemon(rig.base / "state", rig.base / "mnt", size="2G", env=rig.env, prefix=["setsid"]).start()
    try:
        pid = daemon.proc.pid  # type: ignore[union-attr]
        (daemon.mount / "f").write_bytes(b"x")  # the threads serving requests exist by now
        assert nice_values(pid) == {os.getpriority(os.PRIO_PROCESS, 0)}
        assert os.getsid(pid) == pid
        assert Path(f"/proc/{pid}/autogroup").read_text().split()[-1] == "0"  # a new session's
        assert daemon.stop() == 0
    finally:
        daemon.stop_hard()


def test_a_daemon_serves_at_serve_nice_when_set(rig: Rig) -> None:
    """`[node] serve_nice`: once it serves, every thread of the daemon and the autogroup of the
    session it leads run at that value (a loaded machine then keeps requests ahead of other
    sessions' work: awsomefsd/priority.py)."""
    daemon = Daemon(rig.base / "state", rig.base / "mnt", size="2G", prefix=["setsid"],
                    env={**rig.env, "AWSOMEFS_NODE__SERVE_NICE": "-5"}).start()
    try:
        pid = daemon.proc.pid  # type: ignore[union-attr]
        (daemon.mount / "f").write_bytes(b"x")  # the threads serving requests exist by now
        assert {int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()[16])
                for tid in os.listdir(f"/proc/{pid}/task")} == {-5}
        assert Path(f"/proc/{pid}/autogroup").read_text().split()[-1] == "-5"
        assert (daemon.mount / "f").read_bytes() == b"x"
        assert daemon.stop() == 0
    finally:
        daemon.stop_hard()


def test_after_a_crash_synced_bytes_survive_and_descriptors_keep_working(rig: Rig) -> None:
    first = rig.daemon().start()
    second = None
    try:
        work = first.mount / "work"
        work.mkdir()
        write_durably(work / "read-me", b"r" * 10_000)  # the crash below tests the writer's bytes, not these
        reader = Reader(work / "read-me")
        shell = start_shell(work)
        synced_at = LINES // 4
        writer = start_writer(work / "log", sync_at=synced_at)
        wait_for(lambda: writer.has("synced"), 60, "the writer's fsync")

        first.kill()
        assert is_mounted(first.mount), "the keeper holds the mount's descriptor: it is not stale"
        second = rig.daemon().start()
        assert "continuing the mount" in second.logs() and "crash" in second.logs(), second.logs()

        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 120, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        done = next(line for line in writer.lines if line.startswith("done"))
        assert done.endswith("[5]"), f"one EIO reports the unsynced writes the crash may have lost: {done}"
        cached = (work / "log").read_bytes()  # through the kernel's page cache
        content = read_uncached(work / "log")
        # ...and the kernel forgot what it had cached of the file at its own offsets: a reader
        # saw what the file holds
        assert cached == content, "the kernel's cache still held the appends the crash lost"
        assert content[: len(expected(synced_at + 1))] == expected(synced_at + 1), "every synced byte survives"
        # The appends after the crash went to the end of the file as it is, not to the kernel's
        # cached size, which counted the lost ones: lines went missing, but no run of zeros.
        zero = content.find(bytes(1))
        assert zero == -1, f"zeros where lost appends were, from byte {zero} of {len(content)}"
        numbers = [int(line[:6]) for line in content.splitlines()]
        assert content == b"".join(LINE % n for n in numbers), "only whole lines"
        assert numbers == sorted(set(numbers)) and numbers[-1] == LINES - 1, numbers
        assert reader.read_size() == 10_000
        reader.close()
        assert shell_run(shell, "echo again > after && cat after") == ["again"]
        shell.stdin.close()  # type: ignore[union-attr]
        assert shell.wait(30) == 0
        assert second.stop() == 0, second.logs()
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()


def test_without_a_keeper_sigusr2_leaves_the_daemon_serving() -> None:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-restart-", dir="/var/tmp"))
    daemon = Daemon(base / "state", base / "mnt", size="1G", env=KERNEL).start()
    try:
        daemon.proc.send_signal(signal.SIGUSR2)  # type: ignore[union-attr]
        wait_for(lambda: "not handing it over" in daemon.logs(), 30, "the refusal")
        (daemon.mount / "still").write_text("served")
        assert (daemon.mount / "still").read_text() == "served"
        assert daemon.stop() == 0
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


def test_a_kept_descriptor_of_another_mount_is_not_served(rig: Rig) -> None:
    """The record names the mount the descriptor served; after an unmount behind the keeper's back
    the next daemon mounts afresh instead of serving a dead connection."""
    first = rig.daemon().start()
    try:
        first.proc.send_signal(signal.SIGUSR2)  # type: ignore[union-attr]
        assert first.proc.wait(60) == EXIT_HANDED_OVER  # type: ignore[union-attr]
        subprocess.run(["umount", "-l", str(first.mount)], check=True)
        wait_for(lambda: not is_mounted(first.mount), 10, "the unmount")
        started = time.monotonic()
        second = rig.daemon().start()
        assert "mounting afresh" in second.logs(), second.logs()
        assert time.monotonic() - started < 30
        (second.mount / "fresh").write_text("yes")
        assert second.stop() == 0, second.logs()
    finally:
        first.stop_hard()


APPENDER = r"""
import os, sys
path = sys.argv[1]
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
os.write(fd, b"a" * 8192)
os.fsync(fd)
parent = os.open(os.path.dirname(path), os.O_RDONLY)
os.fsync(parent)
os.write(fd, b"b" * 8192)  # acknowledged, never synced: the crash loses it
print("written", flush=True)
sys.stdin.readline()  # the daemon is killed and the next one continues the mount meanwhile
os.write(fd, b"c" * 8192)
errors = []
for attempt in range(2):  # the first sync reports the loss once; the next succeeds
    try:
        os.fsync(fd)
        break
    except OSError as exc:
        errors.append(exc.errno)
os.close(fd)
print("done", errors, flush=True)
"""


def test_appends_after_a_crash_go_to_the_end_of_what_the_file_holds(rig: Rig) -> None:
    """Whole pages appended through a descriptor opened before a crash: the kernel's cached size
    counts the pages the crash lost, and it sends that as the offset of the next append. The
    append goes to the end of what the file holds instead (no run of zeros in the file), and a
    reader sees what the file holds, not the kernel's cached pages of the lost bytes.

    Without the writeback cache: under it the kernel keeps the size and the pages as its own and
    sends them back to the next daemon (`test_after_a_crash_pages_the_kernel_still_held_reach_the_next_daemon`)."""
    env = {**rig.env, "AWSOMEFS_MOUNT__WRITEBACK_CACHE": "false"}
    first = Daemon(rig.base / "state", rig.base / "mnt", size="2G", env=env).start()
    second = None
    try:
        path = first.mount / "appended"
        appender = subprocess.Popen([sys.executable, "-c", APPENDER, str(path)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, cwd="/")
        lines = Lines(appender)
        wait_for(lambda: lines.has("written") or appender.poll() is not None, 30, "the appends before the crash")
        first.kill()
        second = Daemon(rig.base / "state", rig.base / "mnt", size="2G", env=env).start()
        assert appender.stdin is not None
        appender.stdin.write("\n")
        appender.stdin.flush()
        assert appender.wait(60) == 0, lines.lines
        assert lines.lines[-1] == "done [5]", "one EIO reports the lost append"
        holds = b"a" * 8192 + b"c" * 8192
        assert path.read_bytes() == holds, "a reader sees what the file holds, not the lost pages"
        assert read_uncached(path) == holds
        assert second.stop() == 0, second.logs()
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()


HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
if sys.argv[2] == "durable":
    os.fsync(fd)
    parent = os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY)
    os.fsync(parent)  # the file itself is durable; its bytes below are only in the page cache
os.write(fd, bytes.fromhex(sys.stdin.readline().strip()))
print("written", flush=True)
sys.stdin.readline()  # the daemon is replaced meanwhile
errors = []
for attempt in range(2):  # a crash before: the first sync may report a loss once; the next succeeds
    try:
        os.fsync(fd)
        break
    except OSError as exc:
        errors.append(exc.errno)
try:
    os.close(fd)
    closed = 0
except OSError as exc:
    closed = exc.errno
print("done", errors, closed, flush=True)
"""


def hold_across_a_crash(rig: Rig, env: dict[str, str], name: str, payload: bytes, *, durable: bool) -> tuple[Daemon, str]:
    """A process writes `payload` into a new file `name` (created durably or not) and keeps it
    open while the daemon is killed and another takes over; then fsyncs (twice at most) and
    closes. The next daemon, and the process's last line ("done [fsync errnos] close errno")."""
    first = Daemon(rig.base / "state", rig.base / "mnt", size="1G", env=env).start()
    second = None
    try:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(first.mount / name),
                                   "durable" if durable else "fresh"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
        lines = Lines(holder)
        assert holder.stdin is not None
        holder.stdin.write(payload.hex() + "\n")
        holder.stdin.flush()
        wait_for(lambda: lines.has("written") or holder.poll() is not None, 30, "the write into the page cache")
        first.kill()
        assert is_mounted(first.mount)
        second = Daemon(rig.base / "state", rig.base / "mnt", size="1G", env=env).start()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(60) == 0, lines.lines
        return second, next(line for line in lines.lines if line.startswith("done"))
    except BaseException:
        first.stop_hard()
        if second is not None:
            second.stop_hard()
        raise


def test_after_a_crash_pages_the_kernel_still_held_reach_the_next_daemon(rig: Rig) -> None:
    """The writeback cache ([mount] writeback_cache) leaves a write()'s bytes in the kernel's page
    cache. A crash of the daemon does not lose them: the mount survives (the keeper holds its
    descriptor) and the kernel writes them back to the next daemon, through the descriptor it
    rebuilds. Checked from the device after a clean stop, when no page cache is left."""
    env = {**rig.env, "AWSOMEFS_MOUNT__WRITEBACK_CACHE": "true"}
    payload = os.urandom(2 * 1024 * 1024 + 11)
    second, done = hold_across_a_crash(rig, env, "held", payload, durable=True)
    third = None
    try:
        assert done in ("done [] 0", "done [5] 0"), f"at most one EIO, then the fsync and the close succeed: {done}"
        assert second.stop() == 0, second.logs()
        third = Daemon(rig.base / "state", rig.base / "mnt", size="1G", env=KERNEL).start()
        assert (third.mount / "held").read_bytes() == payload
        assert third.stop() == 0, third.logs()
    finally:
        for d in (second, third):
            if d is not None:
                d.stop_hard()


@pytest.mark.parametrize("writeback", [False, True], ids=["write-through", "writeback"])
def test_a_file_the_crash_took_reports_eio_not_ebadf(rig: Rig, writeback: bool) -> None:
    """A file created after the last durable point is gone with the crash (as on ext4 after a
    power cut); the descriptor that was open on it reports the lost writes (EIO), at fsync and at
    close, never EBADF (which says the application misused its descriptor)."""
    env = {**rig.env, "AWSOMEFS_MOUNT__WRITEBACK_CACHE": "true" if writeback else "false"}
    second, done = hold_across_a_crash(rig, env, "fresh", b"x" * 100_000, durable=False)
    try:
        assert done.startswith("done [5") and done.split()[-1] in ("0", "5"), done
        assert second.stop() == 0, second.logs()
    finally:
        second.stop_hard()


def _free_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize


def test_after_a_crash_deleted_files_free_their_space_once_nothing_holds_them(rig: Rig) -> None:
    """A daemon that continues a mount after a crash does not know which files the kernel holds
    open (the handles were the dead daemon's), so it may not delete an unlinked file at once. It
    deletes it when the kernel forgets the inode: an open descriptor keeps the kernel's inode,
    so a FORGET means nothing holds it. Deleting files after a crash must free their space while
    the mount lives, and a file unlinked while a descriptor from before the crash holds it stays
    readable until that descriptor closes."""
    first = rig.daemon().start()
    second = None
    size = 32 << 20
    try:
        work = first.mount / "work"
        work.mkdir()
        held = work / "held"
        write_durably(held, b"h" * size)
        reader = Reader(held)
        first.kill()
        second = rig.daemon().start()
        assert "crash" in second.logs(), second.logs()

        before = _free_bytes(second.mount)
        big = work / "big"
        with open(big, "wb") as f:
            f.write(os.urandom(1 << 20) * 64)
            f.flush()
            os.fsync(f.fileno())
        assert _free_bytes(second.mount) < before - (60 << 20)
        big.unlink()
        wait_for(lambda: _free_bytes(second.mount) > before - (4 << 20), 30,
                 "the space of a file deleted after the crash to come back")

        freed_held = _free_bytes(second.mount) + size - (4 << 20)
        held.unlink()
        assert reader.read_size() == 1 << 20, "an unlinked file stays readable through a descriptor that holds it"
        assert _free_bytes(second.mount) < freed_held, "the space of a file still held open came back"
        reader.close()
        wait_for(lambda: _free_bytes(second.mount) > freed_held, 30,
                 "the space of the held file to come back once its last descriptor closed")
        assert second.stop() == 0, second.logs()
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()


def test_kernel_invalidations_left_unsent_at_a_hand_over_are_sent_by_the_next_daemon(rig: Rig) -> None:
    """A hand-over stops serving before the site link's last changes reach the kernel (a
    notification may wait for a request, so none is sent after serving stops): the daemon
    records what it had not sent (`Invalidator.left`) and the next one sends it. Here the record
    is given one such target by hand, a cached absence of the root's name `late`; the next
    daemon's invalidation shows as a LOOKUP the kernel had no reason to send otherwise."""
    from awsomefsd.fuse.invalidate import Target, encode_targets
    from awsomefsd.fuse.kernel.takeover import SESSION_FILE
    from awsomefsd.meta.records import ROOT_INO
    from tests.mounted.test_request_counts import Counted

    metrics = ["--metrics-port", "0"]  # on a free port: Counted reads the requests there
    first = rig.daemon(metrics).start()
    second = None
    try:
        def look() -> None:
            assert not (first.mount / "late").exists()

        counted = Counted(first)
        assert counted.during(look).get("lookup") == 1
        assert "lookup" not in counted.during(look), "the kernel caches the absence"
        first.proc.send_signal(signal.SIGUSR2)  # type: ignore[union-attr]
        assert first.proc.wait(60) == EXIT_HANDED_OVER, first.logs()  # type: ignore[union-attr]
        record_path = rig.base / "state" / SESSION_FILE
        record = json.loads(record_path.read_text())
        assert record["handles"] is not None and not record.get("invalidations"), "nothing was left unsent"
        record["invalidations"] = encode_targets([Target.entry(ROOT_INO, b"late")])
        record_path.write_text(json.dumps(record))

        second = rig.daemon(metrics).start()
        assert "sending 1 kernel cache invalidations" in second.logs(), second.logs()
        counted = Counted(second)
        wait_for(lambda: counted.during(look).get("lookup") == 1, 20, "the carried invalidation to reach the kernel")
        assert "lookup" not in counted.during(look), "cached again after the lookup"
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()
