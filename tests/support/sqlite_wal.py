"""SQLite in WAL mode from several processes, checked: the workload that found stale reads.

Each process commits transactions that bump one counter row and insert one row, with SQLite's
default synchronous=FULL and automatic checkpoints (a low `wal_autocheckpoint` makes checkpoints,
which read and rewrite the database file while the other process writes, frequent). Afterwards
`integrity_check` must say ok and the counter and the row count must equal the transactions
committed: a lost update or a stale page read shows up as a wrong count or a corrupt b-tree. Used
by the test suite (tests/mounted/test_workloads.py) and the benchmark (bench/fsbench.py).
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class WalOutcome:
    integrity: str
    counter: int
    rows: int
    expected: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.integrity == "ok" and self.counter == self.expected == self.rows

    def describe(self) -> str:
        return (f"integrity_check {self.integrity!r}, counter {self.counter}, rows {self.rows}, "
                f"expected {self.expected} ({self.seconds:.1f} s)")


def _worker(db: str, txns: int, worker: int, autocheckpoint: int) -> None:
    conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
    for i in range(txns):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
        conn.execute("INSERT INTO rows(worker, seq, body) VALUES (?, ?, ?)", (worker, i, os.urandom(200)))
        conn.execute("COMMIT")
    conn.close()


def _evict_page_cache(db: Path, stop: threading.Event, interval_s: float) -> None:
    """Memory pressure in small: drop the database's cached pages again and again, so that the
    writers' reads reach the filesystem instead of the kernel's page cache."""
    fds: dict[str, int] = {}
    try:
        while not stop.wait(interval_s):
            for name in (str(db), f"{db}-wal"):
                if name not in fds:
                    try:
                        fds[name] = os.open(name, os.O_RDONLY)
                    except FileNotFoundError:
                        continue  # the WAL appears with the first write
                os.posix_fadvise(fds[name], 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        for fd in fds.values():
            os.close(fd)


def run_wal_writers(db: Path, txns_per_process: int, *, processes: int = 2, autocheckpoint: int = 1000,
                    evict_every_s: float | None = None, timeout_s: float = 600) -> WalOutcome:
    """Create `db` afresh, let `processes` processes commit `txns_per_process` each (dropping the
    database's page cache every `evict_every_s` meanwhile, if given), check it."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE counter(id INTEGER PRIMARY KEY, n INTEGER)")
    conn.execute("CREATE TABLE rows(id INTEGER PRIMARY KEY, worker INTEGER, seq INTEGER, body BLOB)")
    conn.execute("INSERT INTO counter VALUES (1, 0)")
    conn.close()
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_worker, args=(str(db), txns_per_process, w, autocheckpoint))
               for w in range(processes)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    stop = threading.Event()
    evictor = None
    if evict_every_s is not None:
        evictor = threading.Thread(target=_evict_page_cache, args=(db, stop, evict_every_s), daemon=True)
        evictor.start()
    deadline = time.monotonic() + timeout_s
    try:
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()
        if evictor is not None:
            evictor.join()
    seconds = time.perf_counter() - start
    stuck = [w for w in workers if w.is_alive()]
    for w in stuck:
        w.kill()
        w.join()
    if stuck:
        raise TimeoutError(f"{len(stuck)} SQLite writers still running after {timeout_s:.0f} s")
    if any(w.exitcode for w in workers):
        raise RuntimeError(f"SQLite writers failed: exit codes {[w.exitcode for w in workers]}")
    conn = sqlite3.connect(db)
    try:
        integrity = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        counter = conn.execute("SELECT n FROM counter WHERE id = 1").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM rows").fetchone()[0]
    except sqlite3.DatabaseError as exc:  # a malformed database is an outcome, not a crash
        integrity, counter, rows = f"database error: {exc}", -1, -1
    finally:
        conn.close()
    return WalOutcome(integrity, counter, rows, processes * txns_per_process, seconds)
