"""A member answers a read-only OPEN with FOPEN_NOFLUSH, as a single node does (design note 149):
a reader's close sends the daemon no FLUSH. Close-to-open is the writer's: what a writer's close
committed is what another node's open reads, also while a reader on the writer's node opened and
closed the file meanwhile, and data still buffered behind a reader's close reaches the other node
at the writer's own close."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.support.cluster import Cluster, Node
from tests.support.daemon import wait_for


def flushes(node: Node) -> float:
    """FUSE FLUSH requests the node's daemon answered so far."""
    found = re.search(r'^awsomefs_fuse_request_seconds_count\{op="flush"\} (\S+)$', node.scrape(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def flushes_since(node: Node, before: float, marker: Path) -> float:
    """FLUSHes answered since `before`, counted once a writer's close of `marker` (one FLUSH,
    answered after every request before it) shows in the metrics; the marker's own is left out."""
    with open(marker, "ab") as f:
        f.write(b".")
    wait_for(lambda: flushes(node) > before, 10, "the marker's FLUSH in the metrics")
    return flushes(node) - before - 1


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_readers_close_on_a_member_sends_no_flush_and_close_to_open_holds(cluster3: Cluster) -> None:
    nodes = cluster3.form(3)
    leader = cluster3.leader(nodes)
    a, b = [n for n in nodes if n is not leader]
    data = os.urandom(9000)
    with open(a.mount / "f", "wb") as f:
        f.write(data)
    assert read(b.mount / "f") == data  # the writer's close on a, then b's open

    before = flushes(a)
    for _ in range(5):
        assert read(a.mount / "f") == data
    assert flushes_since(a, before, a.mount / "marker") == 0, "a reader's close on a member sent a FLUSH"

    # A writer keeps its descriptor open; a reader on the same node sees the buffered bytes and
    # closes; the other node sees them once the writer closes. (No subprocess while the writer's
    # descriptor is open: the child's close of its inherited copy at exec is a FLUSH of its own.)
    more = os.urandom(3000)
    before = flushes(a)
    fd = os.open(a.mount / "g", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, more)
        assert read(a.mount / "g") == more
        assert read(a.mount / "g") == more
    finally:
        os.close(fd)
    assert flushes_since(a, before, a.mount / "marker") == 1, "only the writer's close may flush"
    assert read(b.mount / "g") == more
    before = flushes(b)
    assert read(b.mount / "g") == more
    assert flushes_since(b, before, b.mount / "marker-b") == 0
