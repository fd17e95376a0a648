#!/usr/bin/env python3
"""What each request of a create and an unlink costs the handlers, in process (issue 40).

The daemon's CPU per create is the session's five round trips plus what the handlers behind
them do; this measures the second part alone. A single node's core on a fresh 64 MiB image (no
mount, no kernel): the /dev/fuse transport's handlers (`KernelHandlers`) are called with the
requests the kernel sends for `open(O_CREAT|O_EXCL)` + `close` of `--count` new names in one
directory (LOOKUP of the absent name, CREATE, the directory's GETATTR, FLUSH, RELEASE), what an
untar adds to each (GETXATTR of security.capability, a 4 KiB WRITE, SETATTR of the times after
the close), and then their `unlink` (UNLINK), each kind in turn over every file, and it prints CPU µs (process
time: on a loaded machine wall time also counts the other processes' turns) per request of each
kind. With `--src DIR ...` it runs once per source tree (a checkout's root, e.g. an old build
unpacked by `git archive`), in turn, `--rounds` times, and prints medians, so an old and a new
build are compared in one run.

    .venv/bin/python bench/handler_cost.py [--count 5000] [--rounds 5] [--src /old/tree --src .]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

KINDS = ("lookup", "create", "getattr", "flush", "release", "getxattr", "write", "setattr", "unlink")
"""The first five are a create's requests; getxattr, write and setattr are what an untar adds per file
(the kernel's look for security.capability before the first write, one 4 KiB write, the time set after
the close)."""


def one_round(count: int) -> dict[str, float]:
    """µs per request of each kind on a fresh core (the sources are those on sys.path)."""
    import trio

    from awsomefsd.config import DataSettings, DeviceSettings, NodeSettings, Settings
    from awsomefsd.daemon.node import open_core
    from awsomefsd.fuse.kernel import abi
    from awsomefsd.fuse.kernel.abi import Body, Fattr, Op
    from awsomefsd.fuse.kernel.handlers import KernelHandlers
    from awsomefsd.fuse.kernel.session import Handler
    from awsomefsd.io.device import BlockDevice, create_image
    from awsomefsd.io.superblock import format_device
    from awsomefsd.meta.errors import FsError

    tmp = Path(tempfile.mkdtemp(prefix="handler-cost-", dir="/var/tmp"))
    try:
        image = tmp / "device.img"
        create_image(image, 64 << 20)
        with BlockDevice.open(image, direct=False) as device:
            format_device(device, cluster_id=uuid.uuid4(), label="handler-cost")
        core = open_core(Settings(node=NodeSettings(state_dir=tmp / "state", name="handler-cost"),
                                  device=DeviceSettings(path=image, shared=False, direct_io=False),
                                  data=DataSettings(delayed_free_ms=200)))
        handlers = KernelHandlers(core.ops, cache_dirs=True)  # as on a single node
        result: dict[str, float] = {}

        def request(op: int, nodeid: int, body: bytes = b"") -> tuple[abi.Header, bytes]:
            data = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), op, 1, nodeid, 0, 0, 1, 0, 0) + body
            return abi.parse_header(data), data

        async def timed(kind: str, handler: Handler, requests: list[tuple[abi.Header, bytes]]) -> list[object]:
            answers: list[object] = []
            began = time.process_time()
            for header, data in requests:
                try:
                    answers.append(await handler(header, Body(data)))
                except FsError as exc:  # answered with its errno, as the session does
                    answers.append(exc.errno)
            result[kind] = (time.process_time() - began) / count * 1e6
            return answers

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(core.log.run)  # the group commit, as in the daemon
                await nursery.start(core.data.run)  # its flusher and the batch of closed files
                directory = (await core.ops.mknod(abi.ROOT_ID, b"d", 0o40755, 0, 0, 0)).ino
                names = [b"f%d\0" % i for i in range(count)]
                await timed("lookup", handlers.lookup, [request(Op.LOOKUP, directory, n) for n in names])
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                made = await timed("create", handlers.create, [
                    request(Op.CREATE, directory, abi.CREATE_IN.pack(flags, 0o100644, 0o022, 0) + n) for n in names])
                opened = [(abi.ENTRY_OUT.unpack_from(entry)[0], abi.OPEN_OUT.unpack_from(out)[0])
                          for entry, out in made]  # type: ignore[misc]
                await timed("getattr", handlers.getattr,
                            [request(Op.GETATTR, directory, abi.GETATTR_IN.pack(0, 0, 0))] * count)
                await timed("getxattr", handlers.getxattr, [
                    request(Op.GETXATTR, ino, abi.GETXATTR_IN.pack(0, 0) + b"security.capability\0")
                    for ino, _ in opened])
                block = os.urandom(4096)
                await timed("write", handlers.write, [
                    request(Op.WRITE, ino, abi.WRITE_IN.pack(fh, 0, len(block), 0, 0, 0, 0) + block)
                    for ino, fh in opened])
                await timed("flush", handlers.flush,
                            [request(Op.FLUSH, ino, abi.FLUSH_IN.pack(fh, 0, 0, 0)) for ino, fh in opened])
                await timed("release", handlers.release,
                            [request(Op.RELEASE, ino, abi.RELEASE_IN.pack(fh, 0, 0, 0)) for ino, fh in opened])
                stamp = int(time.time()) - 3600  # an hour ago, as tar sets a file's time from its archive
                await timed("setattr", handlers.setattr, [
                    request(Op.SETATTR, ino, abi.SETATTR_IN.pack(Fattr.ATIME | Fattr.MTIME, 0, 0, 0, 0, stamp, stamp,
                                                                 0, 0, 0, 0, 0, 0, 0, 0, 0))
                    for ino, _ in opened])
                await timed("unlink", handlers.unlink, [request(Op.UNLINK, directory, n) for n in names])
                nursery.cancel_scope.cancel()

        try:
            trio.run(run)
        finally:
            core.close()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--src", action="append", default=[], help="a source tree to measure (repeatable)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one round, for --src
    args = parser.parse_args()
    sources = args.src or ["."]
    if args.json:
        print(json.dumps(one_round(args.count)))
        return
    figures: dict[str, dict[str, list[float]]] = {src: {} for src in sources}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for src in sources:  # in turn: the machine's load moves alike for each
            env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
            out = subprocess.run([sys.executable, __file__, "--json", "--count", str(args.count)],
                                 env=env, cwd=src, check=True, capture_output=True, text=True).stdout
            for kind, value in json.loads(out).items():
                figures[src].setdefault(kind, []).append(value)
            load.append(os.getloadavg()[0])
    print(f"load average {min(load):.1f}-{max(load):.1f}; CPU µs per request, median (min-max) of "
          f"{args.rounds}, {args.count} files")
    for src, kinds in figures.items():
        cells = [f"{k} {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for k, v in kinds.items()]
        per_create = sum(statistics.median(kinds[k]) for k in KINDS[:5] if k in kinds)
        print(f"{src}: " + ", ".join(cells) + f"; a create's five {per_create:.1f}")


if __name__ == "__main__":
    main()
