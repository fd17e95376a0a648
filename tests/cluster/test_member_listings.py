"""A member's kernel keeps the directory listings it read (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE), as
a single node's does, and drops one once a change another node made to that directory has been
applied (`AppliedCommands.keep_listing`, design note 141; the rule itself, on a simulated log:
tests/cluster/test_listing_kept.py): a listing repeated on one node costs its daemon no READDIR,
and every listing still shows every change another node made before it began, also when that
node put the directory's mtime back as it was. (This kernel also drops a kept listing itself
when the directory's attributes, refreshed after the daemon invalidates them, show a change:
the daemon's answer at OPENDIR is what holds when that refresh has not happened yet.)"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from tests.support import seeds
from tests.support.cluster import Cluster, Node

RANDOM_STEPS = 150


def readdirs(node: Node) -> float:
    """READDIR and READDIRPLUS requests the node's daemon answered so far."""
    text = node.scrape()
    return sum(float(found.group(1)) for op in ("readdir", "readdirplus")
               if (found := re.search(rf'^awsomefs_fuse_request_seconds_count{{op="{op}"}} (\S+)$', text, re.MULTILINE)))


def caches_dropped() -> int:
    """How often anything on this machine dropped the kernel's caches (/proc/vmstat): a dropped
    listing is read again whatever the daemon said."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("drop_pagecache "):
            return int(line.split()[1])
    return 0


def create(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def test_a_member_keeps_its_listings_until_another_node_changes_the_directory(cluster3: Cluster) -> None:
    nodes = cluster3.form(3)
    leader = cluster3.leader(nodes)
    a, b = [n for n in nodes if n is not leader]
    d, e = a.mount / "listed", b.mount / "listed"
    d.mkdir()
    names = {f"f{i:03d}" for i in range(200)}
    for name in names:
        create(d / name)

    for _attempt in range(3):  # another test may drop the machine's caches meantime
        dropped = caches_dropped()
        assert set(os.listdir(d)) == names
        before = readdirs(a)
        assert set(os.listdir(d)) == names
        asked = readdirs(a) - before
        if caches_dropped() == dropped:
            break
    assert asked == 0, f"a listing repeated on the node that read it sent {asked:.0f} READDIRs"

    # b's changes show in a's next listing; b puts the directory's mtime back each time, so the
    # kernel's own check of the kept listing cannot notice.
    def changed_by_b(change: str, expected: set[str]) -> None:
        times = os.stat(e)
        if change == "create":
            create(e / "new")
        elif change == "rename":
            os.rename(e / "f000", e / "moved")
        else:
            os.unlink(e / "f001")
        os.utime(e, ns=(times.st_atime_ns, times.st_mtime_ns))
        assert os.stat(d).st_mtime_ns == times.st_mtime_ns
        assert set(os.listdir(d)) == expected, f"a's listing after b's {change}"

    expected = names | {"new"}
    changed_by_b("create", expected)
    expected = (expected - {"f000"}) | {"moved"}
    changed_by_b("rename", expected)
    changed_by_b("unlink", expected - {"f001"})


def test_every_nodes_listings_follow_a_random_sequence_of_changes(cluster3: Cluster) -> None:
    """Seeded, replayable (AWSOMEFS_SEED): one change at a time by a random node (create, unlink,
    rename within or between two directories, mkdir, rmdir), then a listing of both directories on
    a random node (twice: the second from what its kernel kept), compared with a model. The
    delegations move at nearly every step, and each node's kernel keeps listings across them.
    On this kernel it also passes with the daemon's rule planted away, and with the attribute
    invalidations of other nodes' changes too (the directory's mtime changes at each step, and
    the kernel compares it at each listing from the start): a guard of the whole, not of the
    rule, which tests/cluster/test_listing_kept.py checks."""
    seed = seeds.fresh_one("member-listings")
    rng = random.Random(seed)
    nodes = cluster3.form(3)
    dirs = ("p", "q")
    (nodes[0].mount / "p").mkdir()
    (nodes[0].mount / "q").mkdir()
    model: dict[str, set[str]] = {d: set() for d in dirs}
    subdirs: set[tuple[str, str]] = set()
    for step in range(RANDOM_STEPS):
        node = rng.choice(nodes)
        d = rng.choice(dirs)
        files = sorted(model[d] - {name for parent, name in subdirs if parent == d})
        kind = rng.choice(["create", "create", "unlink", "rename", "mkdir", "rmdir"])
        where = f"seed {seed} step {step}: node {node.index} {kind} in {d}"
        if kind == "create" or (kind in ("unlink", "rename") and not files):
            name = f"f{step}"
            create(node.mount / d / name)
            model[d].add(name)
        elif kind == "unlink":
            name = rng.choice(files)
            os.unlink(node.mount / d / name)
            model[d].discard(name)
        elif kind == "rename":
            name, to = rng.choice(files), rng.choice(dirs)
            new = f"r{step}"
            os.rename(node.mount / d / name, node.mount / to / new)
            model[d].discard(name)
            model[to].add(new)
        elif kind == "mkdir" or not any(parent == d for parent, _ in subdirs):
            name = f"d{step}"
            (node.mount / d / name).mkdir()
            model[d].add(name)
            subdirs.add((d, name))
        else:
            parent, name = rng.choice(sorted(sd for sd in subdirs if sd[0] == d))
            (node.mount / parent / name).rmdir()
            model[parent].discard(name)
            subdirs.discard((parent, name))
        looker = rng.choice(nodes)
        for listed in dirs:
            for again in ("", " again"):
                got = set(os.listdir(looker.mount / listed))
                assert got == model[listed], f"{where}; node {looker.index} lists {listed}{again}: " \
                    f"extra {sorted(got - model[listed])}, missing {sorted(model[listed] - got)}"
