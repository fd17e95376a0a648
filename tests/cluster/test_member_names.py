"""A member's kernel caches the names of the directories it holds as long as a single node's does,
and forgets them when another node comes to change them (issue 42; docs/coherence.md, mechanism
2): a stat loop on one node sees every unlink, rename, create and chmod another node made before
the loop's stat began, while the node that holds the directory answers its own stats from the
kernel's caches."""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from pathlib import Path

import pytest

from awsomefsd.cli.cluster import CLUSTER_ENTRY_TIMEOUT_S
from tests.support.cluster import Cluster, Node
from tests.support.daemon import wait_for


def metric(node: Node, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", node.scrape(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def lookups(node: Node) -> float:
    """FUSE LOOKUP requests the node's daemon answered so far."""
    return metric(node, 'awsomefs_fuse_request_seconds_count{op="lookup"}')


def why_dropped(node: Node) -> str:
    """What may have made the kernel drop its names (for a failure's message): a loaded machine
    can make a node miss its renewals, and an expiry drops every name."""
    return (f"names dropped {metric(node, 'awsomefs_kernel_names_dropped_total'):.0f} times, "
            f"lease expiries {metric(node, 'awsomefs_lease_expiries_total'):.0f}")


def create(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def pinned(paths: list[Path]) -> list[int]:
    """O_PATH descriptors (no request reaches the daemon) that keep the paths' dentries in the
    kernel's cache: other programs on this machine drop the caches (`drop_caches`), and a stat of
    a dropped name asks the daemon whatever its timeout. What is measured is the timeout."""
    return [os.open(path, os.O_PATH) for path in paths]


def test_held_names_stay_cached_and_another_nodes_changes_show_at_once(cluster3: Cluster) -> None:
    nodes = cluster3.form(3)
    leader = cluster3.leader(nodes)
    a, b = [n for n in nodes if n is not leader]
    d = a.mount / "d"
    d.mkdir()
    names = [f"f{i:03d}" for i in range(300)]
    for name in names:
        create(d / name)
    assert not (d / "late").exists()  # "no such name", told while a holds d
    fds = pinned([d / name for name in names])

    # The names a created in the directory it holds outlive the 1 s a member caches others'.
    time.sleep(CLUSTER_ENTRY_TIMEOUT_S + 0.2)
    before = lookups(a)
    for name in names:
        os.stat(d / name)
    asked = lookups(a) - before
    assert asked < len(names) / 10, f"{asked:.0f} of {len(names)} stats of held names reached the daemon ({why_dropped(a)})"

    # Another node changes the directory: each change shows on a at once, the stat right after it
    # returned (a's kernel cached every name for seconds). A stat loop runs on a meanwhile.
    seen_errors: list[BaseException] = []
    stop = threading.Event()

    def stat_loop() -> None:
        while not stop.is_set():
            for name in names[10:60]:
                try:
                    os.stat(d / name)
                except OSError as exc:
                    seen_errors.append(exc)

    looper = threading.Thread(target=stat_loop, daemon=True)
    looper.start()
    try:
        e = b.mount / "d"
        os.unlink(e / "f001")
        assert not (d / "f001").exists(), "a's kernel still shows a name b unlinked"
        os.rename(e / "f002", e / "g002")
        assert not (d / "f002").exists(), "a's kernel still shows a name b renamed away"
        assert (d / "g002").exists()
        create(e / "late")
        assert (d / "late").exists(), "a's kernel still says 'no such file' of a name b created"
        os.rename(e / "f003", e / "f004")  # over an existing name: a must see the other inode
        assert (d / "f004").stat().st_ino == (e / "f004").stat().st_ino
        os.chmod(e / "f005", 0o600)
        wait_for(lambda: (d / "f005").stat().st_mode & 0o777 == 0o600, 5.0, "b's chmod seen on a")
    finally:
        stop.set()
        looper.join(30)
        for fd in fds:
            os.close(fd)
    assert not seen_errors, seen_errors[:3]
    assert sorted(os.listdir(d)) == sorted(["g002", "late", *(n for n in names if n not in ("f001", "f002", "f003"))])

    # b takes the directory (an unlink is made where its delegation is; b's create above may have
    # been made by a for b, and its looks answered by a: design notes 145 and 148) and caches "late"
    # for long; a takes it back for a change, and b's kernel forgets b's names then.
    os.unlink(b.mount / "d" / "f006")
    assert (b.mount / "d" / "late").exists()
    os.unlink(d / "late")
    with pytest.raises(OSError) as gone:
        os.stat(b.mount / "d" / "late")
    assert gone.value.errno == errno.ENOENT


def test_names_stay_cached_after_an_idle_give_back_until_another_node_takes_the_directory(cluster3: Cluster) -> None:
    nodes = cluster3.form(3)
    leader = cluster3.leader(nodes)
    a, b = [n for n in nodes if n is not leader]
    d = a.mount / "idle"
    d.mkdir()
    names = [f"f{i:03d}" for i in range(100)]
    for name in names:
        create(d / name)
    fds = pinned([d / name for name in names])
    wait_for(lambda: a.status()["cluster"]["ahead"]["delegations"] == 0, 20.0, "a gives its idle delegations back")

    before = lookups(a)
    for name in names:
        os.stat(d / name)
    asked = lookups(a) - before
    for fd in fds:
        os.close(fd)
    assert asked < len(names) / 10, (f"{asked:.0f} of {len(names)} stats reached the daemon after the give-back "
                                     f"({why_dropped(a)})")

    # b takes the free directory and renames: a drops its names when it applies b's grant (the
    # replication lag; without that its kernel would show the old name of the file, which is
    # still there, for a minute).
    os.rename(b.mount / "idle" / "f000", b.mount / "idle" / "g000")
    wait_for(lambda: not (d / "f000").exists(), 5.0, "b's rename seen on a")
    assert (d / "g000").exists() and (d / "f001").exists()
