"""The local caches of tiered data: fixed-size chunks of objects, in memory (hot) and in a node-local
directory (warm), each bounded in bytes and evicting the least recently used chunk first.

A chunk is cached as fetched and trusted by nobody: the reader checks every block it returns
against the CRC32C kept in metadata, and drops a chunk that fails (a damaged cache file, a store
that answered wrong bytes) before fetching it again. So the disk cache needs no fsync and no
manifest: a file written half before a crash is just a chunk that fails verification, and a
temporary file is removed at the next start. Thread-safe: the reader fetches in worker threads.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
TEMP_SUFFIX = ".part"
_OWN_FILE = re.compile(r"^[0-9a-f]{40}\.[0-9]+(\.part)?$")
"""The names this cache writes (chunk_name, and its temporary form): nothing else in the directory
is indexed, evicted or removed, should an operator point `cache_dir` at a shared directory."""


def chunk_name(key: str, index: int) -> str:
    """A chunk's file name: a digest of the object key (keys may hold any character) and its index."""
    return f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.{index}"


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    evicted: int = 0
    dropped: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.memory_hits + self.disk_hits + self.misses
        return (self.memory_hits + self.disk_hits) / total if total else 0.0


class ChunkCache:
    """Chunks by (object key, chunk index): memory LRU of `memory_bytes` in front of a disk LRU of
    `disk_bytes` in `directory` (None: memory only)."""

    def __init__(self, directory: Path | None, *, disk_bytes: int, memory_bytes: int) -> None:
        assert disk_bytes >= 0 and memory_bytes >= 0
        self.directory = directory
        self.disk_limit = disk_bytes if directory is not None else 0
        self.memory_limit = memory_bytes
        self.stats = CacheStats()
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._disk: OrderedDict[str, int] = OrderedDict()  # name -> size, least recently used first
        self._lock = threading.Lock()
        if directory is not None:
            self._load(directory)

    def _load(self, directory: Path) -> None:
        """Index what a previous run left, oldest use first; remove half-written files."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        found = []
        foreign = 0
        for entry in os.scandir(directory):
            if not _OWN_FILE.match(entry.name) or not entry.is_file(follow_symlinks=False):
                foreign += 1
                continue
            if entry.name.endswith(TEMP_SUFFIX):
                os.unlink(entry.path)
                continue
            st = entry.stat(follow_symlinks=False)
            found.append((st.st_atime_ns, entry.name, st.st_size))
        for _, name, size in sorted(found):
            self._disk[name] = size
            self.stats.disk_bytes += size
        if foreign:
            log.warning("the tiering cache directory %s holds %d entries it did not write: left alone "
                        "(give the cache a directory of its own)", directory, foreign)
        self._evict_disk()

    def get(self, key: str, index: int) -> bytes | None:
        return self.get_hot(key, index) or self.get_warm(key, index)

    def get_hot(self, key: str, index: int) -> bytes | None:
        """From memory only: never blocks, for the event loop itself."""
        name = chunk_name(key, index)
        with self._lock:
            data = self._memory.get(name)
            if data is not None:
                self._memory.move_to_end(name)
                self.stats.memory_hits += 1
            return data

    def get_warm(self, key: str, index: int, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes [start, end) of the chunk from the disk, or None: a miss. Blocks on the disk. A
        whole chunk read is kept in memory from then on; a part is not (a random 4 KiB read would
        otherwise read the whole chunk from the disk)."""
        name = chunk_name(key, index)
        with self._lock:
            on_disk = name in self._disk
            if on_disk:
                self._disk.move_to_end(name)
        if on_disk:
            assert self.directory is not None
            whole = start == 0 and end is None
            try:
                if whole:
                    data = (self.directory / name).read_bytes()
                else:
                    with open(self.directory / name, "rb", buffering=0) as f:
                        length = (end if end is not None else os.fstat(f.fileno()).st_size) - start
                        data = os.pread(f.fileno(), length, start)
                    if len(data) != length:
                        raise OSError(errno.EIO, f"{len(data)} of {length} bytes")
            except OSError as exc:
                log.warning("tier cache: cannot read %s (%s): dropped", name, exc.strerror or exc)
                self.drop(key, index)
            else:
                with self._lock:
                    self.stats.disk_hits += 1
                    if whole:
                        self._remember(name, data)
                return data
        with self._lock:
            self.stats.misses += 1
        return None

    def put(self, key: str, index: int, data: bytes) -> None:
        name = chunk_name(key, index)
        with self._lock:
            self._remember(name, data)
            to_disk = self.directory is not None and 0 < len(data) <= self.disk_limit and name not in self._disk
        if not to_disk:
            return
        assert self.directory is not None
        temp = self.directory / (name + TEMP_SUFFIX)
        try:
            temp.write_bytes(data)
            os.replace(temp, self.directory / name)
        except OSError as exc:  # a full or broken cache disk costs speed, never a read
            log.warning("tier cache: cannot write %s (%s)", name, exc)
            temp.unlink(missing_ok=True)
            return
        with self._lock:
            if name not in self._disk:
                self._disk[name] = len(data)
                self.stats.disk_bytes += len(data)
            self._evict_disk()

    def drop(self, key: str, index: int) -> None:
        """Forget a chunk everywhere (it failed verification, or could not be read)."""
        name = chunk_name(key, index)
        with self._lock:
            data = self._memory.pop(name, None)
            if data is not None:
                self.stats.memory_bytes -= len(data)
            size = self._disk.pop(name, None)
            if size is not None:
                self.stats.disk_bytes -= size
            self.stats.dropped += 1
        if size is not None and self.directory is not None:
            (self.directory / name).unlink(missing_ok=True)

    def _remember(self, name: str, data: bytes) -> None:
        if len(data) > self.memory_limit:
            return
        old = self._memory.pop(name, None)
        if old is not None:
            self.stats.memory_bytes -= len(old)
        self._memory[name] = data
        self.stats.memory_bytes += len(data)
        while self.stats.memory_bytes > self.memory_limit:
            _, evicted = self._memory.popitem(last=False)
            self.stats.memory_bytes -= len(evicted)

    def _evict_disk(self) -> None:
        while self.stats.disk_bytes > self.disk_limit and self._disk:
            name, size = self._disk.popitem(last=False)
            self.stats.disk_bytes -= size
            self.stats.evicted += 1
            assert self.directory is not None
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                pass
