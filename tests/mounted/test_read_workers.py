"""Read workers (`[mount] read_workers`, docs/multicore.md step 1) as users see them: real daemons
with two workers, real processes reading and writing.

- The differential exerciser (also against a daemon without workers, whose reader starts the
  common READ itself without a task): 4 processes do random opens, reads (buffered after dropping the
  page cache, and O_DIRECT), writes (buffered and O_DIRECT), truncates, fsyncs and renames, on
  files of their own and on shared ones, and do every operation on a copy on tmpfs too; every
  read must return what the copy holds. A process works on a shared file under a lock it holds
  across the operation on both, so every read there follows the writes answered before it. Reads
  go to workers when the file is cold, writes and everything else to the daemon: a worker that
  served a file written moments ago from the state LMDB committed before the write would return
  old bytes (fs/hotmap.py). Seeded; the seed is in the failure message
  (AWSOMEFS_READ_WORKERS_SEED replays one).
- A worker killed under a read load: no read fails or hangs (the daemon serves the READs the
  worker held, R6), a new worker serves.
- A hand-over, and a crash, with workers under a read load: the reader sees every byte and no
  error, and the workers of the daemon before are gone.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounted.conftest import running_daemon
from tests.support.daemon import AWSOMEFSD, REPO, Daemon, is_mounted, wait_for
from tests.support.seeds import fresh_one

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
]

WORKERS = {"AWSOMEFS_MOUNT__TRANSPORT": "kernel", "AWSOMEFS_MOUNT__READ_WORKERS": "2"}
PROCESSES = 4
SECONDS = float(os.environ.get("AWSOMEFS_READ_WORKERS_S", "6"))
BLOCK = 4096
MAX_SIZE = 64 * BLOCK
SHARED = 3
OWN = 3


def served_by_workers(d: Daemon) -> int:
    """Reads the workers answered, from the line the daemon logs when they stop."""
    for line in reversed(d.logs().splitlines()):
        if "read workers:" in line:
            return int(line.split("read workers:")[1].split()[0])
    raise AssertionError("the daemon logged no read worker summary:\n" + d.logs()[-3000:])


def worker_pids(d: Daemon) -> list[int]:
    assert d.proc is not None
    out = subprocess.run(["pgrep", "-P", str(d.proc.pid), "-f", "fuse-worker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


# -- the exerciser ------------------------------------------------------------------------------------
class Mismatch(AssertionError):
    pass


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, max(n, BLOCK))


def _read(path: Path, offset: int, size: int, direct: bool) -> bytes:
    if direct:
        start, end = offset // BLOCK * BLOCK, -(-(offset + size) // BLOCK) * BLOCK
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = _aligned(end - start)
            got = os.preadv(fd, [memoryview(buf)[: end - start]], start)
            return bytes(buf[offset - start : min(got, offset - start + size)]) if got > offset - start else b""
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _write(path: Path, offset: int, data: bytes, direct: bool) -> None:
    flags = os.O_WRONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        if direct:
            buf = _aligned(len(data))
            buf[: len(data)] = data
            os.pwritev(fd, [memoryview(buf)[: len(data)]], offset)
        else:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def exercise(seed: int, index: int, mount: Path, mirror: Path, lock: multiprocessing.synchronize.Lock,
             deadline: float, trace: list[str]) -> int:
    """One process's random operations; returns how many reads it checked. Raises Mismatch."""
    rng = random.Random(f"{seed}:{index}")
    own = [f"p{index}-{i}" for i in range(OWN)]
    shared = [f"s{i}" for i in range(SHARED)]
    held: dict[str, tuple[int, int]] = {}  # a writer kept open across operations (mount fd, mirror fd)
    checked = 0
    while time.monotonic() < deadline:
        name = rng.choice(own + shared)
        with lock if name in shared else _nothing():
            m, c = mount / name, mirror / name
            op = rng.choices(["read", "dread", "write", "dwrite", "truncate", "fsync", "rename", "hold", "drop"],
                             [6, 6, 4, 2, 1, 1, 1, 1, 1])[0]
            size = os.path.getsize(c)
            trace.append(f"{op} {name} size {size}")
            del trace[:-40]
            if op in ("read", "dread"):
                offset = rng.randrange(0, size + BLOCK)
                length = rng.randrange(1, 4 * BLOCK)
                got = _read(m, offset, length, direct=op == "dread")
                want = _read(c, offset, length, direct=False)
                checked += 1
                if got != want:
                    raise Mismatch(f"{op} of {name} at {offset}+{length}: {len(got)} bytes, {len(want)} expected, "
                                   f"first difference at {_first_difference(got, want)}")
            elif op in ("write", "dwrite"):
                direct = op == "dwrite"
                offset = rng.randrange(0, MAX_SIZE // BLOCK) * BLOCK if direct else rng.randrange(0, MAX_SIZE)
                length = rng.randrange(1, 4) * BLOCK if direct else rng.randrange(1, 3 * BLOCK)
                data = rng.randbytes(length)
                if name in held:
                    os.pwrite(held[name][0], data, offset)
                    os.pwrite(held[name][1], data, offset)
                else:
                    _write(m, offset, data, direct)
                    _write(c, offset, data, False)
            elif op == "truncate":
                size = rng.randrange(0, MAX_SIZE)
                os.truncate(m, size)
                os.truncate(c, size)
            elif op == "fsync" and name in held:
                os.fsync(held[name][0])
            elif op == "rename" and name in own:
                other = rng.choice(own)
                os.rename(m, mount / other)
                os.rename(c, mirror / other)
                if name in held or other in held:  # descriptors follow the file; keep it simple
                    for n in (name, other):
                        if n in held:
                            os.close(held[n][0])
                            os.close(held[n][1])
                            del held[n]
                if name != other:  # the name is gone: make it again, empty
                    for root in (mount, mirror):
                        (root / name).write_bytes(b"")
            elif op == "hold" and name in own and name not in held:
                held[name] = (os.open(m, os.O_WRONLY), os.open(c, os.O_WRONLY))
            elif op == "drop" and name in held:
                for fd in held.pop(name):
                    os.close(fd)
    for fds in held.values():
        for fd in fds:
            os.close(fd)
    return checked


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _child(seed: int, index: int, mount: Path, mirror: Path, lock: multiprocessing.synchronize.Lock,
           deadline: float, results: multiprocessing.Queue[tuple[int, str | int]]) -> None:
    trace: list[str] = []
    try:
        results.put((index, exercise(seed, index, mount, mirror, lock, deadline, trace)))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put((index, f"process {index}: {type(exc).__name__}: {exc}\nlast operations: {trace}"))


@pytest.fixture(scope="module")
def workers_daemon() -> Iterator[Daemon]:
    with running_daemon("awsomefs-workers-", env=WORKERS, extra=["--metrics-port", "0"]) as d:
        yield d


def test_reads_served_by_workers_never_return_bytes_older_than_an_answered_write(workers_daemon: Daemon) -> None:
    before = served_in_metrics(workers_daemon)
    run_exerciser(workers_daemon.mount)
    assert served_in_metrics(workers_daemon) > before, "the workers served none of the exerciser's reads"


def test_reads_the_daemon_starts_without_a_task_never_return_bytes_older_than_an_answered_write() -> None:
    """The same exerciser without workers: the daemon's reader starts the common READ of a cold
    file itself, without a task (Session.start_read, Reader.start_read)."""
    with running_daemon("awsomefs-noworkers-", env={"AWSOMEFS_MOUNT__TRANSPORT": "kernel",
                                                   "AWSOMEFS_MOUNT__READ_WORKERS": "0"}) as d:
        run_exerciser(d.mount)


def run_exerciser(mount: Path) -> None:
    seed = int(os.environ.get("AWSOMEFS_READ_WORKERS_SEED") or fresh_one("read-workers-exerciser"))
    work = mount / f"ex{seed}"
    work.mkdir()
    mirror = Path(tempfile.mkdtemp(prefix="awsomefs-mirror-", dir="/dev/shm"))
    try:
        for name in [f"s{i}" for i in range(SHARED)] + [f"p{p}-{i}" for p in range(PROCESSES) for i in range(OWN)]:
            data = random.Random(f"{seed}:{name}").randbytes(MAX_SIZE // 2)
            (work / name).write_bytes(data)
            (mirror / name).write_bytes(data)
        ctx = multiprocessing.get_context("fork")
        lock, results = ctx.Lock(), ctx.Queue()
        deadline = time.monotonic() + SECONDS
        procs = [ctx.Process(target=_child, args=(seed, i, work, mirror, lock, deadline, results))
                 for i in range(PROCESSES)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=SECONDS + 120) for _ in procs]
        for p in procs:
            p.join(30)
        failures = [str(r) for _, r in outcomes if isinstance(r, str)]
        assert not failures, f"seed {seed} (AWSOMEFS_READ_WORKERS_SEED={seed} replays it):\n" + "\n".join(failures)
        checked = sum(r for _, r in outcomes if isinstance(r, int))
        assert checked > 100, f"only {checked} reads checked in {SECONDS} s"
        print(f"seed {seed}: {checked} reads checked")
    finally:
        shutil.rmtree(mirror, ignore_errors=True)


def test_workers_serve_cold_reads_and_a_killed_worker_fails_no_read(workers_daemon: Daemon) -> None:
    path = workers_daemon.mount / "cold"
    data = os.urandom(1 << 20)
    write_cold(path, data)
    pids = worker_pids(workers_daemon)
    assert len(pids) == 2, pids
    reader = subprocess.Popen([sys.executable, "-c", COLD_READER, str(path), "15"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert reader.stdout is not None
    assert reader.stdout.readline().strip() == "reading"
    time.sleep(0.5)
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: len(set(worker_pids(workers_daemon)) - {pids[0]}) == 2, 30, "a new worker")
    out, _ = reader.communicate(timeout=60)  # a hang fails here
    assert reader.returncode == 0, out
    ok, failed, _errnos = out.split()[0:3]
    assert int(ok) > 1000 and failed == "0", out
    assert "the session serves the READs it held; starting another" in workers_daemon.logs()
    # and the reads after it are right, answered by workers
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        assert os.preadv(fd, [buf], 0) == 1 << 20 and buf[:] == data
    finally:
        os.close(fd)


def test_a_stopped_worker_holds_no_read_for_ever() -> None:
    """A worker stopped with SIGSTOP (a debugger, an operator) keeps the READs handed to it, and
    the kernel times no FUSE request out: the pool kills a worker that has held a READ for
    STUCK_S, the session serves what it held and another starts. (A hand-over with a worker
    stopped: `test_a_restart_with_workers_under_a_read_load_fails_no_read`.)"""
    from awsomefsd.fuse.kernel.workers import STUCK_S

    with running_daemon("awsomefs-stuck-", env=WORKERS) as d:
        path = d.mount / "cold"
        data = os.urandom(1 << 20)
        write_cold(path, data)
        pids = worker_pids(d)
        assert len(pids) == 2, pids
        reader = subprocess.Popen([sys.executable, "-c", COLD_READER, str(path), str(STUCK_S + 5)],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "reading"
        os.kill(pids[0], signal.SIGSTOP)
        try:
            out, _ = reader.communicate(timeout=STUCK_S * 4 + 30)  # a read held for ever fails here
        finally:
            with contextlib.suppress(ProcessLookupError):  # killed by then, if the pool did its part
                os.kill(pids[0], signal.SIGCONT)
        assert reader.returncode == 0, out
        ok, failed, _errnos = out.split()[0:3]
        assert int(ok) > 100 and failed == "0", out
        assert "stopped or wedged; killed" in d.logs(), d.logs()[-3000:]
        wait_for(lambda: len(set(worker_pids(d)) - {pids[0]}) == 2, 30, "a new worker")


COLD_READER = """
import mmap, os, random, sys, threading, time
path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
want = open(path, "rb").read()
print("reading", flush=True)
ok, failed, errnos, wrong = [0], [0], set(), []
end = time.monotonic() + seconds

def reader(seed):
    rng, buf = random.Random(seed), mmap.mmap(-1, 4096)
    while time.monotonic() < end:
        offset = rng.randrange(len(want) // 4096) * 4096
        try:
            os.preadv(fd, [buf], offset)
        except OSError as exc:
            failed[0] += 1
            errnos.add(str(exc.errno))
            continue
        if buf[:] != want[offset:offset + 4096]:
            wrong.append(offset)
        ok[0] += 1

threads = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not wrong, wrong[:10]
print(ok[0], failed[0], ",".join(sorted(errnos)) or "-")
""".replace("READERS", "8")
"""Reads from 8 threads at once: the daemon hands a READ to a worker only while another read is in
flight (a lone reader's reads it serves itself: handing each would only add a hop)."""


def write_cold(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it, so the daemon holds nothing of the file (cold, R1) and
    workers serve its reads. fsync, not sync(2): Linux sends no SYNCFS to a /dev/fuse server, so
    after `sync` the daemon may still buffer the closed file (its batch not yet due) and forward
    every read of it (CI failed so: 0 of 500 reads served by workers, nothing yet written)."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def direct_reads(path: Path, count: int) -> None:
    """Write a 256 KiB file, make it cold, and read it `count` times 4 KiB at a time with O_DIRECT
    from 8 threads: each read is one READ request the daemon (or a worker) serves from the device,
    several in flight at once (a lone reader's are the daemon's)."""
    write_cold(path, os.urandom(1 << 18))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

    def reads(first: int) -> None:
        buf = mmap.mmap(-1, 4096)
        for i in range(first, count, 8):
            os.preadv(fd, [buf], (i % 64) * 4096)

    try:
        threads = [threading.Thread(target=reads, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.close(fd)


def test_the_summary_and_the_metrics_count_reads_the_workers_served() -> None:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-workers-count-", dir="/var/tmp"))
    d = Daemon(base / "state", base / "mnt", size="1G", env=WORKERS, extra=["--metrics-port", "0"]).start()
    try:
        direct_reads(d.mount / "f", 500)
        metrics = scrape(d)
        served = dict(re.findall(SERVED, metrics, re.M))
        # Most of the 500 reads, not all: under load a worker forwards a read that took over half
        # the grace period (R4) or met the file hot, and the daemon serves it.
        in_metrics = sum(float(v) for v in served.values())
        assert set(served) == {"0", "1"} and in_metrics >= 250, metrics[-3000:]
        assert re.search(r'^awsomefs_read_worker_requests_forwarded_total\{worker="0"\} ', metrics, re.M), metrics
        assert d.stop() == 0
        assert served_by_workers(d) >= in_metrics, d.logs()[-2000:]  # the summary counts them too
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_reads_the_daemon_starts_without_a_task_count_in_the_read_latency_metric() -> None:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-noworkers-count-", dir="/var/tmp"))
    d = Daemon(base / "state", base / "mnt", size="1G", env={"AWSOMEFS_MOUNT__TRANSPORT": "kernel",
                                                             "AWSOMEFS_MOUNT__READ_WORKERS": "0"},
               extra=["--metrics-port", "0"]).start()
    try:
        direct_reads(d.mount / "f", 300)

        def counted() -> float:
            reads = re.search(r'^awsomefs_fuse_request_seconds_count\{op="read"\} (\S+)$', scrape(d), re.M)
            return 0.0 if reads is None else float(reads.group(1))

        # A read is observed just after its answer is written: the reader may scrape before the
        # last one is counted (CI run 88: 299 of 300).
        wait_for(lambda: counted() >= 300, 10, f"every read counted (so far {counted():.0f})")
        assert d.stop() == 0
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        shutil.rmtree(base, ignore_errors=True)


SERVED = r'^awsomefs_read_worker_reads_served_total\{worker="(\d)"\} (\S+)$'


def served_in_metrics(d: Daemon) -> float:
    """Reads the workers served so far, by the metrics (the daemon was started with `--metrics-port 0`)."""
    return sum(float(v) for _, v in re.findall(SERVED, scrape(d), re.M))


def scrape(d: Daemon) -> str:
    """The daemon's /metrics (it was started with `--metrics-port 0`)."""
    port = re.search(r"metrics on http://127.0.0.1:(\d+)/", d.logs())
    assert port is not None, d.logs()[-2000:]
    return str(urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10).read().decode())


@pytest.mark.parametrize("how", ["hand-over", "crash", "hand-over, a worker stopped"])
def test_a_restart_with_workers_under_a_read_load_fails_no_read(how: str) -> None:
    """A hand-over stops the workers after the session stopped reading, and what they did not answer
    is served; a crash takes them with the daemon, and the next daemon's RESEND has the kernel send
    what they held again: either way the reader sees every byte and no error. A worker stopped
    with SIGSTOP keeps SIGTERM pending: the hand-over kills it after STOP_DEADLINE_S."""
    base = Path(tempfile.mkdtemp(prefix="awsomefs-workers-restart-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    sock = base / "keeper.sock"
    keeper = subprocess.Popen([*AWSOMEFSD, "fd-keeper", "--socket", str(sock)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
    first = second = None
    try:
        assert keeper.stdout is not None and keeper.stdout.readline().startswith("awsomefsd: keeping")
        env = {**WORKERS, "AWSOMEFS_MOUNT__FD_KEEPER": str(sock)}
        first = Daemon(base / "state", base / "mnt", size="2G", env=env).start()
        path = first.mount / "cold"
        write_cold(path, os.urandom(1 << 20))
        old_workers = worker_pids(first)
        assert len(old_workers) == 2
        reader = subprocess.Popen([sys.executable, "-c", COLD_READER, str(path), "8"], stdout=subprocess.PIPE,
                                  text=True, cwd="/")
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        time.sleep(1)
        assert first.proc is not None
        if how == "crash":
            first.kill()
        else:
            if how.endswith("stopped"):
                os.kill(old_workers[0], signal.SIGSTOP)
            first.proc.send_signal(signal.SIGUSR2)
            assert first.proc.wait(60) == 75, first.logs()
            assert how.endswith("stopped") == ("did not stop within" in first.logs()), first.logs()
        second = Daemon(base / "state", base / "mnt", size="2G", env=env).start()
        assert ("crash" if how == "crash" else "handed over") in second.logs(), second.logs()
        out, _ = reader.communicate(timeout=60)
        assert reader.returncode == 0, out
        ok, failed, _errnos = out.split()
        assert failed == "0" and int(ok) > 100, out
        assert len(worker_pids(second)) == 2
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in old_workers), 30,
                 "the workers of the daemon before to end")
        assert second.stop() == 0, second.logs()
        assert served_by_workers(second) > 0
        assert not is_mounted(base / "mnt")
    finally:
        for d in (first, second):
            if d is not None:
                d.stop_hard()
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(30)
        subprocess.run(["umount", "-l", str(base / "mnt")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
