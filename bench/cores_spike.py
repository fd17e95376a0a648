"""Spike for issue 40 ("all cores serve requests"): one FUSE session served by N worker processes.

What it answers, before anything is built into the daemon (docs/multicore.md):
- do 2 worker processes, each reading its own cloned /dev/fuse descriptor (FUSE_DEV_IOC_CLONE),
  serve 4 KiB O_DIRECT random reads faster than 1, and by how much on this machine;
- what a change costs when the worker that read it forwards it to the one process that applies
  changes (the proposer), over a unix SEQPACKET socket: µs per create, against that process
  serving the create itself.

The filesystem is bench/kernelfloor.py's in-memory one. Each process builds the same read-only
snapshot (directory /ro and the file /ro/data, the same inode numbers: the stand-in for the shared
LMDB environment every worker opens read-only). Workers serve read requests (lookup, getattr,
open, read, release, opendir, readdir, statfs) on /ro themselves; every other request, and every
request about a node outside /ro, is forwarded whole (its raw bytes) to the proposer, which runs
it on its own copy and sends back the answer's payload or errno. The bench never changes /ro, so
the copies cannot disagree: the rules that make that hold in the daemon are in docs/multicore.md.
Workers come in two kinds: `trio` (today's Session on the clone) and `sync` (no event loop:
blocking reads, handlers run to completion, blocking calls to the proposer).

    python bench/cores_spike.py                  # every mode of MODES, alternating, 3 runs
    python bench/cores_spike.py --modes alone,sync1,sync2 --runs 5 --runtime 8 --creates 5000
    python bench/cores_spike.py --serve M --workers N [--sync] [--proposer-reads]   # until Ctrl-C
    python bench/cores_spike.py --ping 20000            # the forwarding channel alone
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import random
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernelfloor import Node, NullOperations

from awsomefsd.fuse.kernel import abi, channel
from awsomefsd.fuse.kernel.abi import Body, Header, Op
from awsomefsd.fuse.kernel.handlers import KernelHandlers
from awsomefsd.fuse.kernel.inline import INLINE_SINGLE_NODE
from awsomefsd.fuse.kernel.session import (
    NO_REPLY,
    READ_BUFFER,
    Handler,
    Negotiated,
    Payload,
    Session,
)
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, Inode

FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
READY = "cores_spike: mounted "
RO_INO, DATA_INO = ROOT_INO + 1, ROOT_INO + 2
FROZEN = frozenset({RO_INO, DATA_INO})
LOCAL_OPS = frozenset({Op.LOOKUP, Op.GETATTR, Op.OPEN, Op.READ, Op.RELEASE, Op.FLUSH, Op.OPENDIR, Op.READDIR,
                       Op.READDIRPLUS, Op.RELEASEDIR, Op.STATFS, Op.GETXATTR, Op.LISTXATTR, Op.ACCESS, Op.LSEEK})
"""Requests a worker serves itself when they concern a node of the read-only snapshot."""
REPLY = struct.Struct("<Qi")  # unique, errno (0: payload follows; -1: no answer to send)
MAX_MESSAGE = 1 << 21


def snapshot(size: int) -> NullOperations:
    """The same tree in every process: /ro/data, `size` bytes of a fixed pseudo-random pattern."""
    ops = NullOperations()
    now = time.time_ns()
    ops.nodes[RO_INO] = Node(Inode(RO_INO, stat.S_IFDIR | 0o755, 0, 0, 2, 0, now, now, now, parent=ROOT_INO))
    data = bytearray(random.Random(40).randbytes(size))
    ops.nodes[DATA_INO] = Node(Inode(DATA_INO, stat.S_IFREG | 0o644, 0, 0, 1, size, now, now, now), data=data)
    ops.nodes[ROOT_INO].children[b"ro"] = RO_INO
    ops.nodes[RO_INO].children[b"data"] = DATA_INO
    ops.next_ino = DATA_INO + 1
    return ops


# -- the proposer: applies what workers forward -----------------------------------------------------
def send(sock: socket.socket, message: bytes) -> bool:
    """Send without trio's checkpoints around the call: a round trip through trio's socket wrappers
    cost ~100-140 µs of CPU here, a direct call ~7-12 µs (docs/multicore.md). False: no room."""
    try:
        sock.send(message)
    except BlockingIOError:
        return False
    return True


async def send_all(sock: socket.socket, message: bytes) -> None:
    while not send(sock, message):
        await trio.lowlevel.wait_writable(sock)


def received(sock: socket.socket, buffer: bytearray) -> Iterator[bytes]:
    """Every message queued now (one wake-up drains them all); raises EOFError at the end."""
    while True:
        try:
            n = sock.recv_into(buffer)
        except BlockingIOError:
            return
        if not n:
            raise EOFError
        yield bytes(buffer[:n])


async def apply_forwarded(sock: socket.socket, table: dict[int, Handler]) -> None:
    """Serve one worker's forwarded requests in arrival order (the proposer's single writer)."""
    sock.setblocking(False)
    buffer = bytearray(MAX_MESSAGE)
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for data in received(sock, buffer):
                header = abi.parse_header(data)
                err, payload = 0, b""
                try:
                    result = await table[header.opcode](header, Body(data))
                    if result is NO_REPLY:
                        err = -1
                    elif isinstance(result, list):
                        payload = b"".join(result)
                    elif result is not None:
                        payload = bytes(result)
                except FsError as exc:
                    err = exc.errno
                except KeyError:
                    err = errno.ENOSYS
                await send_all(sock, REPLY.pack(header.unique, err) + payload)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # the worker is gone: the kernel ended the requests it held with ECONNABORTED; the
        # others serve on (docs/multicore.md, R6)
        print(f"cores_spike: a worker left ({sock.fileno()})", file=sys.stderr, flush=True)


# -- a worker: its own cloned descriptor, local reads, forwarded changes ---------------------------
class Forwarder:
    """Sends a request to the proposer and waits for its answer (several may be in flight)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.waiting: dict[int, tuple[trio.Event, list[tuple[int, bytes]]]] = {}

    async def receive(self) -> None:
        buffer = bytearray(MAX_MESSAGE)
        try:
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                for data in received(self.sock, buffer):
                    unique, err = REPLY.unpack_from(data)
                    event, box = self.waiting.pop(unique)
                    box.append((err, data[REPLY.size:]))
                    event.set()
        except EOFError:
            return

    async def forward(self, header: Header, body: Body) -> Payload:
        event, box = trio.Event(), []  # type: ignore[var-annotated]
        self.waiting[header.unique] = (event, box)
        await send_all(self.sock, body.buf)
        await event.wait()
        err, payload = box[0]
        if err == -1:
            return NO_REPLY  # type: ignore[no-any-return]
        if err:
            raise FsError(err)
        return payload or None


def worker_table(local: dict[int, Handler], forwarder: Forwarder) -> dict[int, Handler]:
    def route(opcode: int, handler: Handler) -> Handler:
        if opcode not in LOCAL_OPS:
            return forwarder.forward

        async def routed(header: Header, body: Body) -> Payload:
            if header.nodeid in FROZEN:
                return await handler(header, body)
            return await forwarder.forward(header, body)
        return routed
    return {opcode: route(opcode, handler) for opcode, handler in local.items()}


def clone(session_fd: int) -> int:
    fd = os.open(channel.DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("I", session_fd))
    return fd


def run_worker(session_fd: int, sock_fd: int, negotiated: Negotiated, size: int) -> None:
    fd = clone(session_fd)
    os.close(session_fd)
    sock = socket.socket(fileno=sock_fd)
    local = KernelHandlers(snapshot(size), cache_dirs=True).table  # type: ignore[arg-type]

    async def main() -> None:
        forwarder = Forwarder(sock)
        session = Session(fd, worker_table(local, forwarder), negotiated=negotiated, inline=INLINE_SINGLE_NODE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forwarder.receive)
            await session.serve()
            nursery.cancel_scope.cancel()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the proposer unmounts; the session then ends
    trio.run(main)


def finish(coro: Coroutine[Any, Any, Payload]) -> Payload:
    """Run a handler that never waits (the in-memory one's) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a local handler waited")


def run_sync_worker(session_fd: int, sock_fd: int, size: int) -> None:
    """A worker without an event loop: blocking reads of its clone (the kernel wakes one blocked
    reader per request, where every epoll waiter wakes), requests served or forwarded one at a
    time with blocking calls, answers written at once."""
    fd = clone(session_fd)
    os.close(session_fd)
    os.set_blocking(fd, True)
    sock = socket.socket(fileno=sock_fd)
    local = KernelHandlers(snapshot(size), cache_dirs=True).table  # type: ignore[arg-type]
    request, answer = bytearray(READ_BUFFER), bytearray(MAX_MESSAGE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            n = os.readv(fd, [request])
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                continue
            return  # ENODEV: unmounted
        data = bytes(request[:n])
        header = abi.parse_header(data)
        if header.opcode == Op.INTERRUPT:
            continue  # local requests finish at once; the spike's forwarded ones too
        err, payload = 0, b""
        if header.opcode in LOCAL_OPS and header.nodeid in FROZEN:
            try:
                result = finish(local[header.opcode](header, Body(data)))
                payload = b"".join(result) if isinstance(result, list) else bytes(result or b"")
            except FsError as exc:
                err = exc.errno
        else:
            sock.send(data)
            got = sock.recv_into(answer)
            _, err = REPLY.unpack_from(answer)
            payload = bytes(answer[REPLY.size:got])
        try:
            if err == -1:
                continue
            if err:
                os.write(fd, abi.error_reply(header.unique, err))
            else:
                os.writev(fd, [abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), 0, header.unique), payload])
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


def serve(mount: Path, workers: int, size: int, *, sync: bool = False, proposer_reads: bool = False) -> None:
    """Mount; answer INIT; then serve alone (workers == 0) or start `workers` processes on clones
    (`sync`: `run_sync_worker`; `proposer_reads`: the proposer reads its own descriptor too)."""
    mount.mkdir(parents=True, exist_ok=True)
    fd = channel.open_device()
    channel.mount(fd, mount, allow_other=True)
    ops = snapshot(size)
    table = KernelHandlers(ops, cache_dirs=True).table  # type: ignore[arg-type]
    session = Session(fd, table, inline=INLINE_SINGLE_NODE)
    children: list[subprocess.Popen[bytes]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if workers == 0:
                nursery.start_soon(session.serve)
            else:
                nursery.start_soon(trio.to_thread.run_sync, os.stat, mount)  # makes the kernel send INIT
                neg = await session.negotiate()
                if proposer_reads:
                    nursery.start_soon(session.serve)
                for _ in range(workers):
                    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    for s in (mine, theirs):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
                    children.append(subprocess.Popen(
                        [sys.executable, __file__, "--worker", str(fd), str(theirs.fileno()), str(neg.minor),
                         str(neg.flags), str(neg.max_write), str(size), "sync" if sync else "trio"],
                        pass_fds=(fd, theirs.fileno())))
                    theirs.close()
                    nursery.start_soon(apply_forwarded, mine, table)
            await trio.to_thread.run_sync(os.stat, mount)
            print(READY + str(mount), os.getpid(), *(c.pid for c in children), flush=True)  # every server process
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    try:
        trio.run(main)
    finally:
        channel.unmount(mount)
        for child in children:
            child.wait(10)
        os.close(fd)


# -- the comparison ------------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(mode: list[str], mount: Path, args: argparse.Namespace, run: int) -> dict[str, float]:
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(mount), *mode,
                               "--size", str(args.size)], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        if not line.startswith(READY):
            raise SystemExit(f"cores_spike: the server did not start ({line.strip()!r})")
        pids = [int(p) for p in line.split()[3:]]
        cpu0 = cpu_seconds(pids)
        fio = subprocess.run(
            ["fio", "--name=rand", f"--filename={mount}/ro/data", "--rw=randread", "--bs=4k", "--direct=1",
             "--ioengine=psync", f"--numjobs={args.jobs}", "--thread", "--time_based", f"--runtime={args.runtime}",
             "--group_reporting", "--output-format=json", f"--size={args.size}"],
            check=True, capture_output=True, text=True)
        job = json.loads(fio.stdout)["jobs"][0]["read"]
        cpu_read = cpu_seconds(pids) - cpu0
        iops = job["iops"]
        reads = job["total_ios"]
        cpu0 = cpu_seconds(pids)
        target = mount / f"c{run}"
        creator = subprocess.run([sys.executable, "-c", CREATOR, str(target), str(args.creates)],
                                 check=True, capture_output=True, text=True)
        create_s = float(creator.stdout)
        cpu_create = cpu_seconds(pids) - cpu0
        return {"iops": iops, "cpu_us_per_read": 1e6 * cpu_read / max(reads, 1),
                "us_per_create": 1e6 * create_s / args.creates, "cpu_us_per_create": 1e6 * cpu_create / args.creates}
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
        if str(mount) in Path("/proc/mounts").read_text():  # the server died before it could unmount
            channel.unmount(mount)


CREATOR = """
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
t = time.perf_counter()
for i in range(n):
    os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
print(time.perf_counter() - t)
"""


MODES = {
    "alone": "--workers 0",  # today: the proposer reads every request
    "trio1": "--workers 1",  # workers on trio (epoll: every worker wakes for every request)
    "trio2": "--workers 2",
    "sync1": "--workers 1 --sync",  # workers with blocking reads, no event loop
    "sync2": "--workers 2 --sync",
    "sync1+p": "--workers 1 --sync --proposer-reads",  # the proposer reads its descriptor too
}


def compare(args: argparse.Namespace) -> None:
    modes = {name: mode.split() for name, mode in MODES.items() if name in args.modes.split(",")}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for run in range(args.runs):
            for name, mode in modes.items():  # alternating: noise spreads over every mode
                results[name].append(measure(mode, Path(tmp) / "m", args, run))
                loads.append(os.getloadavg()[0])
                print(f"run {run + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    base = statistics.median(r["iops"] for r in next(iter(results.values())))
    print(f"\n4 KiB O_DIRECT random reads, {args.jobs} psync jobs, {args.runtime} s; {args.creates} creates "
          f"(open O_CREAT + close) in one directory; medians of {args.runs} alternating runs")
    print(f"{'mode':16} {'read IOPS':>10} {'vs first':>11} {'CPU µs/read':>12} {'µs/create':>10} {'CPU µs/create':>14}")
    for name, rows in results.items():
        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(r[key] for r in rows)
        print(f"{name:16} {med('iops'):10,.0f} {med('iops') / base:10.2f}x {med('cpu_us_per_read'):12.1f} "
              f"{med('us_per_create'):10.1f} {med('cpu_us_per_create'):14.1f}")
    print(f"load average (1 min) during the runs: {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores")


def ping(count: int) -> None:
    """The forwarding channel alone: 64-byte round trips between two processes over a SEQPACKET
    socket, through trio's socket wrappers and with direct calls (`send`, `received`)."""
    for style in ("trio.socket", "direct"):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child = os.fork()
        if child == 0:
            a.close()
            buffer = bytearray(MAX_MESSAGE)
            while n := b.recv_into(buffer):  # the echo side blocks: only the pinging side varies
                b.send(buffer[:n])
            os._exit(0)
        b.close()

        async def run(style: str = style, a: socket.socket = a) -> float:
            buffer = bytearray(MAX_MESSAGE)
            start = time.perf_counter()
            if style == "direct":
                a.setblocking(False)
                for _ in range(count):
                    await send_all(a, b"x" * 64)
                    got: list[bytes] = []
                    while not got:
                        await trio.lowlevel.wait_readable(a)
                        got = list(received(a, buffer))
            else:
                conn = trio.socket.from_stdlib_socket(a)
                for _ in range(count):
                    await conn.send(b"x" * 64)
                    await conn.recv_into(buffer)
            return time.perf_counter() - start
        cpu0 = time.process_time()
        wall = trio.run(run)
        cpu = time.process_time() - cpu0
        a.close()
        usage = os.wait4(child, 0)[2]
        print(f"{style:12} round trip: {1e6 * wall / count:6.1f} µs wall, {1e6 * cpu / count:6.1f} µs CPU pinging "
              f"side, {1e6 * (usage.ru_utime + usage.ru_stime) / count:6.1f} µs CPU echo side (blocking calls)")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        session_fd, sock_fd, minor, flags, max_write, size = (int(v) for v in sys.argv[2:8])
        if sys.argv[8] == "sync":
            run_sync_worker(session_fd, sock_fd, size)
        else:
            run_worker(session_fd, sock_fd, Negotiated(minor, flags, max_write), size)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=Path, help="serve at this mount point until Ctrl-C")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sync", action="store_true", help="workers without an event loop (blocking reads)")
    parser.add_argument("--proposer-reads", action="store_true", help="the proposer reads its descriptor too")
    parser.add_argument("--modes", default="alone,trio1,trio2,sync1,sync2,sync1+p",
                        help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--size", type=int, default=128 << 20, help="bytes of /ro/data")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=8, help="seconds of fio per run")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--creates", type=int, default=5000)
    parser.add_argument("--ping", type=int, metavar="N", help="only time N round trips of the forwarding channel")
    args = parser.parse_args()
    if args.ping:
        ping(args.ping)
    elif args.serve:
        serve(args.serve.absolute(), args.workers, args.size, sync=args.sync, proposer_reads=args.proposer_reads)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
