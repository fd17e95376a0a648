"""The nemesis test's client workload: one process per node, several client threads, each running a
seeded mix of file system operations on that node's mount and recording every outcome.

    python tests/support/nemesis_client.py --node K --mount DIR --clients N --seed S --until T --out FILE

Why a process of its own (not threads of the test): the test forks (`ip`, `nsenter`, the CLI) while
nodes are stopped, and a forked child closes every descriptor it inherited; closing one that is open
on a FUSE file sends FLUSH, which never returns while that file's node is stopped. This process
never forks. It stops at monotonic time `--until` (CLOCK_MONOTONIC is shared by every process
here, so its times line up with the nemesis's) or when its stdin closes, whichever comes first.

The operations (docs: tests/cluster/test_nemesis.py):
- namespace registers in `ns/`: shared keys `k<i>-g<gen>` used by every client, private keys
  `p<client>-<j>-g<gen>`; `create_excl` (O_CREAT|O_EXCL), `create` (O_CREAT without O_EXCL: never
  EEXIST), `put` (write a fresh file under `tmp/`, fsync, rename it over the key), `get` (read the
  key), `unlink`. A key lives for one generation (`GEN_S`), so each key's history stays short
  enough to check for linearizability;
- appends of self-checking records (writer, sequence, CRC over both and the file's name) with
  O_APPEND, then fsync, to shared logs `logs/s<i>` and to the client's private log `logs/p<client>`.
  The first `--appenders` clients of each node do nothing else (nonstop writers on every node
  contend for the shared logs' write leases); the others mix everything.

Each outcome is one JSON line: client, node, op, key, input, output ("ok", a value, or an errno
name), stage (which system call failed), t0/t1 (monotonic). An operation still running when the
process ends is written with "stuck": true; one that failed while the node's mount was gone (its
daemon stopping or stopped) with "unmounted": true.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECORD_BYTES = 64
GEN_S = 15.0
SHARED_KEYS = 3
PRIVATE_KEYS = 2
SHARED_LOGS = 2
GONE = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT}
WEIGHTS = {"append": 40, "get": 15, "put": 12, "create_excl": 10, "create": 10, "unlink": 10}
APPENDER_WEIGHTS = {"append": 1}
"""The first client of each node only appends, nonstop, mostly to the first shared log: writers
on every node contending for one file's write lease (a starved writer shows here)."""
JOIN_S = 60.0


SLOW_S = 1.0
"""An operation this slow records how long each of its system calls took (`steps`)."""


def _write_synced(fd: int, rec: bytes, mark: Callable[[str], None]) -> tuple[str, str]:
    """One record written whole and fsynced: ("ok", "") or (what went wrong, at which call)."""
    stage = "write"
    try:
        mark("write")
        if os.write(fd, rec) != len(rec):
            return "short", stage
        stage = "fsync"
        mark("fsync")
        os.fsync(fd)
    except OSError as exc:
        return _name(exc), stage
    return "ok", ""


def record(writer: int, seq: int, log: str) -> bytes:
    """One fixed-size, self-checking record: a torn, foreign or misplaced one fails `parse_record`."""
    crc = zlib.crc32(f"{writer}:{seq}:{log}".encode())
    head = f"{writer:04d} {seq:07d} {crc:08x} "
    return (head + "." * (RECORD_BYTES - len(head) - 1) + "\n").encode()


def parse_record(raw: bytes, log: str) -> tuple[int, int] | None:
    """(writer, seq) of a whole, valid record of `log`, else None."""
    try:
        text = raw.decode("ascii")
        writer, seq, crc = int(text[0:4]), int(text[5:12]), int(text[13:21], 16)
    except (UnicodeDecodeError, ValueError):
        return None
    if raw != record(writer, seq, log) or zlib.crc32(f"{writer}:{seq}:{log}".encode()) != crc:
        return None
    return writer, seq


class Recorder:
    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
        self.lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True)
        with self.lock:
            self.fh.write(line + "\n")
            self.fh.flush()


class Client(threading.Thread):
    def __init__(self, node: int, client: int, mount: Path, seed: int, until: float, t0: float,
                 rec: Recorder, stop: threading.Event, *, appender: bool = False) -> None:
        super().__init__(daemon=True, name=f"client-{client}")
        self.node, self.client, self.mount = node, client, mount
        self.appender = appender
        self.rng = random.Random(seed)
        self.until, self.t0, self.rec, self.stop = until, t0, rec, stop
        self.seq = 0
        self.current: dict[str, Any] | None = None
        self.session: tuple[str, int, int] | None = None  # an appender's open log: (name, fd, appends left)
        self.crashed = ""
        self.marks: list[tuple[str, float]] = []  # the current operation's system calls: (name, start)

    def mark(self, step: str) -> None:
        """The current operation begins system call `step` (kept only when the operation is slow)."""
        self.marks.append((step, time.monotonic()))

    # --- one operation each; each returns (output, stage) -----------------------------------------
    def create(self, path: Path, excl: bool) -> tuple[str, str]:
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else 0)
        try:
            self.mark("open")
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            return _name(exc), "open"
        try:
            self.mark("close")
            os.close(fd)
        except OSError as exc:  # the create happened; the close's error is recorded beside it
            return "ok", f"close:{_name(exc)}"
        return "ok", ""

    def put(self, path: Path, value: str) -> tuple[str, str]:
        tmp = self.mount / "tmp" / f"t{self.client}-{self.seq}"
        try:
            self.mark("open")
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as exc:
            return _name(exc), "prepare"
        try:
            try:
                self.mark("write")
                os.write(fd, value.encode())
                self.mark("fsync")
                os.fsync(fd)
            finally:
                self.mark("close")
                os.close(fd)
        except OSError as exc:
            return _name(exc), "prepare"
        try:
            self.mark("rename")
            os.rename(tmp, path)
        except OSError as exc:
            return _name(exc), "rename"
        return "ok", ""

    def get(self, path: Path) -> tuple[str, str]:
        try:
            self.mark("open")
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            return _name(exc), "open"
        try:
            self.mark("read")
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        except OSError as exc:
            try:
                os.close(fd)
            except OSError:
                pass  # the read's error is the one to report (a dead node fails both)
            return _name(exc), "read"
        try:
            self.mark("close")
            os.close(fd)
        except OSError as exc:
            return _name(exc), "close"
        return "=" + b"".join(chunks).decode("latin-1"), ""

    def unlink(self, path: Path) -> tuple[str, str]:
        try:
            self.mark("unlink")
            os.unlink(path)
        except OSError as exc:
            return _name(exc), "unlink"
        return "ok", ""

    def append(self, log: str, rec: bytes) -> tuple[str, str]:
        try:
            self.mark("open")
            fd = os.open(self.mount / "logs" / log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            return _name(exc), "open"
        out, stage = _write_synced(fd, rec, self.mark)
        try:
            self.mark("close")
            os.close(fd)
        except OSError as exc:
            if out == "ok":
                stage, out = "close", _name(exc)
        return out, stage

    def append_held(self, log: str, rec: bytes) -> tuple[str, str]:
        """An appender's append: on a descriptor kept open for a session of appends (a log writer),
        reopened after an error or when the session is over."""
        if self.session is not None and self.session[0] != log:
            self.end_session()
        if self.session is None:
            try:
                self.mark("open")
                fd = os.open(self.mount / "logs" / log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                return _name(exc), "open"
            self.session = (log, fd, self.rng.randint(5, 40))
        name, fd, left = self.session
        out, stage = _write_synced(fd, rec, self.mark)
        self.session = (name, fd, left - 1)
        if out != "ok" or left <= 1:
            closed = self.end_session()
            if closed and out == "ok":
                stage = f"close:{closed}"  # fsync succeeded: the record is acknowledged all the same
        return out, stage

    def end_session(self) -> str:
        if self.session is None:
            return ""
        fd = self.session[1]
        self.session = None
        try:
            self.mark("close")
            os.close(fd)
        except OSError as exc:
            return _name(exc)
        return ""

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """The workload; a client that fails (a bug here, or an answer no system call should give)
        says so on stdout and the process exits non-zero: a client that silently stopped would look
        like a starved one."""
        try:
            self._run()
        except BaseException:
            self.crashed = traceback.format_exc()
            print(f"client {self.client} crashed:\n{self.crashed}", flush=True)

    def _run(self) -> None:
        kinds, weights = zip(*(APPENDER_WEIGHTS if self.appender else WEIGHTS).items())
        shared_share = 0.9 if self.appender else 0.7
        while not self.stop.is_set() and time.monotonic() < self.until:
            self.seq += 1
            kind = self.rng.choices(kinds, weights)[0]
            gen = int((time.monotonic() - self.t0) // GEN_S)
            entry: dict[str, Any] = {"client": self.client, "node": self.node, "op": kind, "seq": self.seq}
            if kind == "append":
                if self.appender and self.session is not None:
                    log = self.session[0]
                elif self.rng.random() >= shared_share:
                    log = f"p{self.client}"
                else:  # appenders all write the first shared log: they contend for one file's lease
                    log = "s0" if self.appender else f"s{self.rng.randrange(SHARED_LOGS)}"
                entry.update(key=log, input=self.seq)
                append = self.append_held if self.appender else self.append
                call = lambda log=log, append=append: append(log, record(self.client, self.seq, log))  # noqa: E731
            else:
                if self.rng.random() < 0.75:
                    key = f"k{self.rng.randrange(SHARED_KEYS)}-g{gen}"
                else:
                    key = f"p{self.client}-{self.rng.randrange(PRIVATE_KEYS)}-g{gen}"
                path = self.mount / "ns" / key
                entry["key"] = key
                if kind == "put":
                    value = f"v{self.client}-{self.seq}"
                    entry["input"] = value
                    call = lambda path=path, value=value: self.put(path, value)  # noqa: E731
                elif kind == "get":
                    call = lambda path=path: self.get(path)  # noqa: E731
                elif kind == "unlink":
                    call = lambda path=path: self.unlink(path)  # noqa: E731
                else:
                    call = lambda path=path, excl=kind == "create_excl": self.create(path, excl)  # noqa: E731
            entry["t0"] = time.monotonic()
            self.current = entry
            self.marks = []
            output, stage = call()
            entry.update(t1=time.monotonic(), output=output, stage=stage)
            if entry["t1"] - entry["t0"] >= SLOW_S:
                ends = [t for _, t in self.marks[1:]] + [entry["t1"]]
                entry["steps"] = [(step, round(end - start, 3)) for (step, start), end in zip(self.marks, ends, strict=True)]
            # still `current` while the mount is looked at: a stat that hangs is a hung operation
            if output not in ("ok", "EEXIST") and not output.startswith("=") and not self.mounted():
                entry["unmounted"] = True  # the daemon's mount was gone: the name was looked up in the empty mount point
            self.current = None
            self.rec.write(entry)
            if output in ("ENOTCONN", "ECONNABORTED") or entry.get("unmounted"):
                self.stop.wait(0.2)  # the node is down: do not spin
        self.end_session()

    def mounted(self) -> bool:
        """Is the node's file system mounted here (not the empty directory under it)?"""
        try:
            return os.stat(self.mount).st_dev != os.stat(self.mount.parent).st_dev
        except OSError:
            return False


def _name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", type=int, required=True)
    parser.add_argument("--mount", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--appenders", type=int, default=1, help="how many of the clients only append")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--until", type=float, required=True, help="CLOCK_MONOTONIC time to stop at")
    parser.add_argument("--t0", type=float, required=True, help="CLOCK_MONOTONIC start of the run (generations)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rec = Recorder(args.out)
    stop = threading.Event()
    clients = [Client(args.node, 10 * args.node + k, args.mount, args.seed * 1000 + 10 * args.node + k, args.until,
                      args.t0, rec, stop, appender=k < args.appenders) for k in range(args.clients)]
    for client in clients:
        client.start()
    print("ready", flush=True)

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.is_set() and time.monotonic() < args.until:
        stop.wait(0.1)
    stop.set()
    deadline = time.monotonic() + JOIN_S
    for client in clients:
        client.join(max(0.0, deadline - time.monotonic()))
    for client in clients:
        current = client.current
        if client.is_alive() and current is not None:
            rec.write({**current, "stuck": True, "t1": None, "output": None, "stage": "stuck"})
    crashed = [client.client for client in clients if client.crashed]
    print(f"done; crashed clients: {crashed}" if crashed else "done", flush=True)
    sys.stdout.flush()
    os._exit(3 if crashed else 0)  # threads stuck in a request on a hung mount must not keep the process


if __name__ == "__main__":
    sys.exit(main())
