"""The multi-process spike (bench/cores_spike.py, docs/multicore.md) serves a real mount correctly.

One FUSE session, answered by two worker processes on cloned /dev/fuse descriptors: reads of the
read-only snapshot come back with the right bytes whoever serves them, and changes (forwarded to
the proposer) are seen by every reader afterwards, from processes the kernel spreads over both. The figures the design note quotes come from this program, so it
must stay correct as it changes.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPIKE = REPO / "bench" / "cores_spike.py"
SIZE = 4 << 20

CLIENT = """
import os, random, sys
mount, size, seed, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pattern = random.Random(40).randbytes(size)
fd = os.open(f"{mount}/ro/data", os.O_RDONLY | os.O_DIRECT)
import mmap
buf = mmap.mmap(-1, 4096)
rng = random.Random(seed)
for _ in range(400):
    block = rng.randrange(size // 4096)
    assert os.preadv(fd, [buf], block * 4096) == 4096
    assert buf[:] == pattern[block * 4096 : (block + 1) * 4096], f"block {block} differs"
mine = mmap.mmap(-1, 4096)
for i in range(files):
    name = f"{mount}/new/p{seed}-{i}"
    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600))
    mine[:] = rng.randbytes(4096)
    fd = os.open(name, os.O_RDWR | os.O_DIRECT)  # OPEN, WRITE and READ: any reader may get each
    assert os.pwritev(fd, [mine], 0) == 4096
    os.close(fd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECT)
    assert os.preadv(fd, [buf], 0) == 4096 and buf[:] == mine[:], f"{name}: not what was written"
    os.close(fd)
print("ok")
"""


def _mounted(mount: Path) -> bool:
    return any(line.split()[1] == str(mount) for line in Path("/proc/mounts").read_text().splitlines())


@pytest.fixture(params=["--sync", "--trio"])
def spike(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The two workers alone read the session (the proposer only applies what they forward), so
    every request goes through a worker; blocking (`--sync`) or trio workers."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    mount = tmp_path / "m"
    style = [request.param] if request.param == "--sync" else []
    server = subprocess.Popen([sys.executable, str(SPIKE), "--serve", str(mount), "--workers", "2", *style,
                               "--size", str(SIZE)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # the ready line, or "" if it died (then the assert says so)
        assert line.startswith("cores_spike: mounted "), f"the spike did not start: {line!r}"
        assert len(line.split()) == 6, line  # the proposer and its two workers
        (tmp_path / "pids").write_text(" ".join(line.split()[3:]))
        yield mount
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        finally:
            if _mounted(mount):
                subprocess.run(["umount", "-l", str(mount)], check=False)
    deadline = time.monotonic() + 10
    while _mounted(mount) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _mounted(mount), "the spike left its mount behind"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_reader_serves_the_same_files(spike: Path) -> None:
    os.mkdir(spike / "new")  # a change, forwarded: every reader must see the directory
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, str(spike), str(SIZE), str(seed), "50"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(3)]
    for client in clients:
        out, err = client.communicate(timeout=90)
        assert client.returncode == 0 and out.strip() == "ok", err[-2000:]
    names = sorted(os.listdir(spike / "new"))
    assert names == sorted(f"p{seed}-{i}" for seed in range(3) for i in range(50))
    assert all(os.stat(spike / "new" / name).st_size == 4096 for name in names)


CREATE = """
import os, sys
try:
    os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600))
    print("created")
except OSError as exc:
    print(exc.errno)
"""


def _waiting_on_proposer(pid: int) -> bool:
    return "skb" in Path(f"/proc/{pid}/wchan").read_text()  # blocked in recv from the proposer


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_dead_worker_fails_its_request_and_the_others_serve_on(spike: Path, request: pytest.FixtureRequest) -> None:
    """R6: the request a worker held when it died ends with ECONNABORTED (no hang, no replay); the
    session and the other worker go on."""
    if request.node.callspec.params["spike"] != "--sync":
        pytest.skip("a trio worker holding a request waits in epoll like an idle one: the holder is not known")
    pids = [int(p) for p in (spike.parent / "pids").read_text().split()]
    proposer, workers = pids[0], pids[1:]
    os.mkdir(spike / "d")
    os.kill(proposer, signal.SIGSTOP)  # a forwarded create then waits in the worker that read it
    try:
        client = subprocess.Popen([sys.executable, "-c", CREATE, str(spike / "d" / "x")], stdout=subprocess.PIPE,
                                  text=True)
        deadline = time.monotonic() + 20
        holder = None
        while holder is None and time.monotonic() < deadline:
            holder = next((pid for pid in workers if _waiting_on_proposer(pid)), None)
            time.sleep(0.02)
        assert holder is not None, "no worker took the create"
        os.kill(holder, signal.SIGKILL)
        out, _ = client.communicate(timeout=20)
        assert out.strip() == str(errno.ECONNABORTED)
    finally:
        os.kill(proposer, signal.SIGCONT)
    survivor = next(pid for pid in workers if pid != holder)
    for i in range(20):  # every request now reaches the survivor
        (spike / "d" / f"after{i}").write_bytes(b"x" * i)
    assert sorted(os.listdir(spike / "d"))[:2] == ["after0", "after1"]
    assert (spike / "d" / "after7").read_bytes() == b"x" * 7
    assert Path(f"/proc/{survivor}").exists()
