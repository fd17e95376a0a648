"""Write-heavy workload for the crash test: files of self-identifying blocks, fsync'd, acknowledged
in a log outside the filesystem only after fsync returned.

Each 4 KiB block of file i, version v, block b is sha256("i:v:b") repeated, so a verifier can tell
whether a block is ours, which version it is, and that it belongs to this file at this offset.
Usage: crash_writer.py MOUNT_DIR ACK_LOG SEED FIRST_FILE
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

BLOCK = 4096


def block_bytes(i: int, v: int, b: int) -> bytes:
    return hashlib.sha256(f"{i}:{v}:{b}".encode()).digest() * (BLOCK // 32)


def content(i: int, v: int, size: int) -> bytes:
    nblocks = -(-size // BLOCK)
    return b"".join(block_bytes(i, v, b) for b in range(nblocks))[:size]


def file_size(i: int) -> int:
    return random.Random(i).randint(1, 300_000)


def main() -> None:
    mount, ack_path, seed, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    versions: dict[int, int] = {}
    i = first
    while True:
        if versions and rng.random() < 0.3:
            target = rng.choice(list(versions))
            v = versions[target] + 1
        else:
            target, v = i, 0
            i += 1
        data = content(target, v, file_size(target))
        fd = os.open(os.path.join(mount, f"f{target}"), os.O_WRONLY | os.O_CREAT, 0o644)
        pos = 0
        while pos < len(data):
            n = rng.choice((100, 4096, 5000, 65536, 200_000))
            pos += os.pwrite(fd, data[pos : pos + n], pos)
        os.fsync(fd)
        os.close(fd)
        versions[target] = v
        os.write(ack, f"{target} {v}\n".encode())
        os.fsync(ack)


if __name__ == "__main__":
    main()
