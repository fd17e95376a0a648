"""Real application processes that hold a mount open while its daemon is replaced: a writer
appending through one descriptor (it reports each write and its fsync errors), a reader holding a
descriptor, and a shell whose working directory is in the mount. Used by the restart tests on one
node (tests/mounted/test_restart.py) and on a cluster member (tests/cluster/test_member_hand_over.py).
Each runs in a process of its own and never in the test process, which must hold nothing open in
the mount (a fork there closes inherited descriptors, each close a FLUSH that waits for a daemon)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from tests.support.daemon import wait_for

LINES = 400
LINE = b"%06d the quick brown fox jumps over the lazy dog\n"

WRITER = r"""
import os, sys, time
path, lines, sync_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
os.fsync(fd)
parent = os.open(os.path.dirname(path), os.O_RDONLY)
os.fsync(parent)
print("open", flush=True)
worst = 0.0
for i in range(lines):
    start = time.monotonic()
    os.write(fd, b"%06d the quick brown fox jumps over the lazy dog\n" % i)
    worst = max(worst, time.monotonic() - start)
    if i == sync_at:
        os.fsync(fd)
        print("synced", i, flush=True)
    print("wrote", i, flush=True)
    time.sleep(0.005)
errors = []
for attempt in range(2):  # a crash before: the first sync reports the loss once, the next succeeds
    try:
        os.fsync(fd)
        break
    except OSError as exc:
        errors.append(exc.errno)
os.close(fd)
print("done", worst, errors, flush=True)
"""


class Lines:
    """A child process's stdout, read on a thread of its own, so a test waits on what it printed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait(self, timeout_s: float) -> int:
        """The process's exit status once it has exited and every line it printed is in `lines`
        (the process can exit before this thread has read its last line)."""
        status = self.proc.wait(timeout_s)
        self._pump_thread.join(timeout_s)
        return status

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.lines)

    def wrote(self) -> int:
        return sum(1 for line in self.lines if line.startswith("wrote"))


READER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
for line in sys.stdin:
    print("read", len(os.pread(fd, 1 << 20, 0)), flush=True)
"""


class Reader:
    """A process holding a descriptor opened before the daemon changes; reads when asked."""

    def __init__(self, path: Path, prefix: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd="/")
        self.lines = Lines(self.proc)
        wait_for(lambda: self.lines.has("open") or self.proc.poll() is not None, 30, "the reader to open")

    def read_size(self) -> int:
        assert self.proc.stdin is not None
        before = len(self.lines.lines)
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        wait_for(lambda: len(self.lines.lines) > before, 60, "the reader's read")
        return int(self.lines.lines[-1].split()[1])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


def start_writer(path: Path, sync_at: int, prefix: Sequence[str] = (), lines: int = LINES) -> Lines:
    """`prefix`: a command the writer runs under (nsenter, to write in another mount namespace)."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", WRITER, str(path), str(lines), str(sync_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    lines = Lines(proc)
    wait_for(lambda: lines.has("open") or proc.poll() is not None, 30, "the writer to open its file")
    assert lines.has("open"), lines.lines
    return lines


def start_shell(directory: Path, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """A shell whose working directory is in the mount, answering each command line it reads."""
    script = "cd \"$0\" && while read cmd; do eval \"$cmd\"; echo END; done"
    return subprocess.Popen([*prefix, "sh", "-c", script, str(directory)], cwd="/",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def shell_run(shell: subprocess.Popen[str], command: str) -> list[str]:
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write(command + "\n")
    shell.stdin.flush()
    out = []
    for line in shell.stdout:
        if line.strip() == "END":
            return out
        out.append(line.strip())
    raise AssertionError(f"the shell ended during {command!r}: {out}")


def expected(count: int) -> bytes:
    return b"".join(LINE % i for i in range(count))


def write_durably(path: Path, data: bytes) -> None:
    """A new file, fsynced with its directory: what must survive a crash of the daemon. sync(1)
    and syncfs(2) are no durability point on a FUSE mount: the kernel sends the daemon nothing
    for them (only virtiofs gets FUSE_SYNCFS), and a test that crashed the daemon after os.sync()
    lost the file now and then."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    parent = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(parent)
    finally:
        os.close(parent)
