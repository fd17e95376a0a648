"""Cross-site replication in the state machine (meta/sites/): two sites, each a state machine on
its own LMDB store, linked; random namespace, attribute and xattr commands on both, shipped
through the outboxes at random moments; after a full exchange both namespaces are identical,
the replicated tree's conflicts are listed alike on both sides, and nothing is applied twice.

Real stores and the real state machine; the link between them is a loop in the test (the wire
comes later). Seeded: a failure names its seed, and `AWSOMEFS_SITES_SEED=n` replays it.
"""

from __future__ import annotations

import errno
import random
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import EPOCH, Stamp
from awsomefsd.crdt.tree import Move
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import Delegated, FsError
from awsomefsd.meta.filemap import all_extents
from awsomefsd.meta.records import ROOT_INO, Extent
from awsomefsd.meta.sites.tables import site_of_cluster
from awsomefsd.meta.sites.tree import TableTree, _pack_log_entry
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore
from awsomefsd.repl.link import Ack, Horizon
from tests.support import seeds


class Site:
    """One site: a state machine on its own store, with its own clock for `now_ns`."""

    def __init__(self, path: Path, cluster_id: str, clock_start: int) -> None:
        self.store = MetaStore(path)
        self.sm = StateMachine(self.store, delayed_free_ns=1000)
        self.id = uuid.UUID(cluster_id).bytes
        with self.store.env.begin(write=True) as txn:
            self.sm.bootstrap(txn, cluster_id=cluster_id, device_id="d", data_extent=(256, 10_000), now_ns=1)
        self.ino, self.ino_end = self.apply(c.ReserveInodes(100_000))
        self.now = clock_start
        self.horizon = Horizon()  # from the peer's acknowledgements: how far both logs may forget
        self.next_block = 256  # a bump allocator over the data blocks (nothing is reclaimed in a test)

    def as_cluster_at(self, level: int) -> None:
        """Make this site a cluster whose log is at `level`: its replicas follow that level's rules
        (`SiteTables.at_level`), as members on an older build make them (a single node follows the newest)."""
        with self.store.env.begin(write=True) as txn:
            txn.put(b"ca_cert", b"-", db=self.store.db["meta"])
            txn.put(b"log_level", level.to_bytes(8, "big"), db=self.store.db["meta"])

    def take_blocks(self, count: int) -> int:
        start = self.next_block
        self.next_block += count
        assert self.next_block <= 256 + 10_000, "the test ran out of blocks"
        return start

    def apply(self, cmd: object) -> Any:
        with self.store.env.begin(write=True) as txn:
            return self.sm.apply(txn, cmd)

    def tick(self) -> int:
        self.now += 1000
        return self.now

    def new_ino(self) -> int:
        self.ino += 1
        return self.ino - 1

    def read(self, fn: Any) -> Any:
        with self.store.env.begin() as txn:
            return fn(txn)

    def folded(self, fn: Any) -> Any:
        """`fn` of the site tables as they are once what waits is folded, changing nothing: the
        same whether this site captures at once or later (tests/repl/test_sites_fold.py)."""
        txn = self.store.env.begin(write=True)
        try:
            self.sm.sites.fold(txn)
            return fn(txn)
        finally:
            txn.abort()

    seeds_whole = True
    """Does `outbox_after` finish the initial sync's walk first (as the node running the link
    proposes SeedSite: repl/seeding.py)? tests/repl/test_sites_seeding.py seeds in slices itself."""

    def outbox_after(self, stamp: Stamp | None) -> list[tuple[Stamp, bytes]]:
        """The outbox after `stamp`, what this site captured folded first (as the node running its
        link keeps folding it: repl/folding.py)."""
        self.apply(c.FoldCapture(1 << 20))
        while self.seeds_whole and self.read(self.sm.sites.seeding) is not None:
            self.apply(c.SeedSite(1 << 20, self.tick()))
        return self.read(lambda txn: self.sm.sites.outbox(txn, stamp, 1 << 20))

    def applied_from_peer(self) -> Stamp | None:
        return self.read(self.sm.sites.applied_from_peer)

    def conflicts(self) -> list[dict[str, Any]]:
        return self.read(self.sm.sites.conflicts)

    def snapshot(self, root: int = ROOT_INO) -> dict[bytes, tuple[Any, ...]]:
        """Every path below the root (or a volume's root): type, mode, owner, times of files,
        xattrs, target, links."""
        def walk(txn: Any) -> dict[bytes, tuple[Any, ...]]:
            found: dict[bytes, tuple[Any, ...]] = {}
            links: dict[int, bytes] = {}

            def visit(ino: int, path: bytes, depth: int) -> None:
                assert depth < 100, "a cycle in the namespace"
                for name, child in sorted(self.sm.ns.names(txn, ino)):
                    if ino == ROOT_INO and name in (b".volumes", b".snapshots", b".conflicts"):
                        continue  # per site; /.conflicts is checked by `kept_copies`
                    inode = self.sm.ns.require_inode(txn, child)
                    here = path + b"/" + name
                    first = links.setdefault(child, here)
                    xattrs = tuple(sorted((key[8:], value) for key, value in self.sm.ns.xattrs(txn, child)))
                    times = () if inode.is_dir else (inode.mtime_ns, inode.atime_ns)
                    target = self.sm.ns.symlink_target(txn, child) if inode.is_symlink else b""
                    blocks = blocks_of(self, txn, child)
                    found[here] = (stat.S_IFMT(inode.mode), stat.S_IMODE(inode.mode), inode.uid, inode.gid,
                                   inode.nlink, times, xattrs, target, first, inode.size, blocks)
                    if inode.is_dir:
                        assert inode.parent == ino, (here, inode.parent, ino)
                        visit(child, here, depth + 1)
            visit(root, b"", 0)
            return found
        return self.read(walk)

    # -- what users do ----------------------------------------------------------------------
    def dirs(self) -> list[int]:
        return [ROOT_INO] + [ino for ino in self._all() if self._inode(ino).is_dir]

    def _all(self) -> list[int]:
        def collect(txn: Any) -> list[int]:
            out: list[int] = []
            stack = [ROOT_INO]
            while stack:
                for _name, child in self.sm.ns.names(txn, stack.pop()):
                    if child in (2, 3, 4):  # /.volumes, /.snapshots, /.conflicts: not the users' tree
                        continue
                    out.append(child)
                    if self.sm.ns.require_inode(txn, child).is_dir:
                        stack.append(child)
            return out
        return self.read(collect)

    def _inode(self, ino: int) -> Any:
        return self.read(lambda txn: self.sm.ns.require_inode(txn, ino))

    def entries(self) -> list[tuple[int, bytes, int]]:
        def collect(txn: Any) -> list[tuple[int, bytes, int]]:
            out = []
            for parent in [ROOT_INO] + [i for i in self._all() if self.sm.ns.require_inode(txn, i).is_dir]:
                for name, child in self.sm.ns.names(txn, parent):
                    if child not in (2, 3, 4):
                        out.append((parent, name, child))
            return out
        return self.read(collect)


def blocks_of(site: Site, txn: Any, ino: int) -> tuple[tuple[int, bytes], ...]:
    """A file's content as (block, checksum) pairs: how its extents are cut up does not matter."""
    return tuple((e.file_block + i, e.checksums[4 * i:4 * i + 4])
                 for e in all_extents(txn, site.store.db["fmap"], ino) for i in range(e.count))


def ship(src: Site, dst: Site, rng: random.Random | None = None, *, count: int | None = None,
         forget: bool = False) -> int:
    """Apply at `dst` what `src` has that `dst` has not applied (a random prefix with `rng`), in
    batches, as the shipper does: a content version's blocks are "copied" to fresh blocks of
    `dst` with the same checksums (what the test compares); returns how many operations.
    `count`: only the first so many. `forget`: then `src` forgets up to the horizon `dst`'s
    acknowledgement gives, as the shipper does (repl/shipper.py)."""
    pending = src.outbox_after(dst.applied_from_peer())
    if rng is not None and pending:
        pending = pending[:rng.randint(0, len(pending))]
    if count is not None:
        pending = pending[:count]
    done = 0
    while done < len(pending):
        batch = pending[done:done + 7]
        operations, extents, counts = [], [], []
        for _, raw in batch:
            sent, ino = src.read(lambda txn, raw=raw: src.sm.sites.shipping(txn, raw))
            operations.append(sent)
            if ino is not None:
                copied = [Extent(e.file_block, dst.take_blocks(e.count), e.count, e.checksums)
                          for e in src.read(lambda txn, ino=ino: list(all_extents(txn, src.store.db["fmap"], ino)))]
                extents += copied
                counts.append(len(copied))
            elif isinstance(o.decode(sent), o.ContentSet):
                counts.append(0)
        after = dst.applied_from_peer()
        dst.apply(c.ApplyRemote(src.id, b"" if after is None else after.pack(), tuple(operations),
                                tuple(extents), tuple(counts), dst.tick()))
        done += len(batch)
    if forget:
        src.horizon.on_ack(Ack(dst.applied_from_peer() or EPOCH, acknowledged_head(dst) or EPOCH))
        stable = src.horizon.advance(src.applied_from_peer() or EPOCH, src.read(src.sm.sites.head) or EPOCH)
        if stable > EPOCH:
            src.apply(c.ForgetSite(stable.pack(), src.tick()))
    return done


def acknowledged_head(site: Site) -> Stamp | None:
    """The head `site` acknowledges with: its last operation folded (what waits for a fold was
    made after the last batch it applied, which folded first: it saw all it acknowledges)."""
    return site.read(site.sm.sites.head)


NAMES = [b"a", b"b", b"c", b"d"]


def random_command(rng: random.Random, site: Site) -> object | None:
    entries = site.entries()
    dirs = site.dirs()
    now = site.tick()
    kind = rng.choice(["file", "file", "dir", "dir", "link", "unlink", "rename", "rename", "rename",
                       "chmod", "utimens", "xattr", "rmxattr", "symlink", "write", "write", "truncate", "fdwrite"])
    if kind == "fdwrite":  # through a descriptor kept open: the file may have no name left
        files = site.folded(lambda txn: [ino for ino in (int.from_bytes(bytes(k), "big") for k, _ in
                                                       txn.cursor(db=site.store.db["sinos"]))
                                       if (inode := site.sm.ns.get_inode(txn, ino)) is not None and inode.is_reg])
        if not files:
            return None
        ino, first, count = rng.choice(files), rng.randint(0, 3), rng.randint(1, 3)
        extent = Extent(first, site.take_blocks(count), count, rng.randbytes(4 * count))
        return c.WriteData(ino, (extent,), (first + count) * 4096, now)
    if kind in ("file", "dir", "symlink"):
        mode = {"file": stat.S_IFREG | 0o644, "dir": stat.S_IFDIR | 0o755, "symlink": stat.S_IFLNK | 0o777}[kind]
        return c.Mknod(rng.choice(dirs), rng.choice(NAMES), site.new_ino(), mode, 1000, 1000, now,
                       target=b"t" * rng.randint(1, 5) if kind == "symlink" else b"")
    if not entries:
        return None
    parent, name, child = rng.choice(entries)
    if kind == "link":
        return c.Link(child, rng.choice(dirs), rng.choice(NAMES), now)
    if kind == "unlink":
        return c.Unlink(parent, name, site._inode(child).is_dir, now)
    if kind == "rename":
        flags = rng.choice([0, 0, 0, c.RENAME_EXCHANGE, c.RENAME_NOREPLACE])
        return c.Rename(parent, name, rng.choice(dirs), rng.choice(NAMES), flags, now)
    if kind in ("write", "truncate"):
        if not site._inode(child).is_reg:
            return None
        if kind == "truncate":
            return c.SetAttr(child, now, size=rng.choice([0, 4096, 3 * 4096]))
        first, count = rng.randint(0, 3), rng.randint(1, 3)
        extent = Extent(first, site.take_blocks(count), count, rng.randbytes(4 * count))
        return c.WriteData(child, (extent,), (first + count) * 4096, now)
    if kind == "chmod":
        return c.SetAttr(child, now, mode=rng.choice([0o600, 0o644, 0o755]), uid=rng.choice([0, 1000]))
    if kind == "utimens":
        return c.SetAttr(child, now, atime_ns=rng.randint(1, 10**9), mtime_ns=rng.randint(1, 10**9))
    if kind == "xattr":
        return c.SetXattr(child, b"user." + rng.choice(NAMES), rng.randbytes(rng.randint(0, 8)), 0, now)
    return c.RemoveXattr(child, b"user." + rng.choice(NAMES), now)


def linked_pair(tmp_path: Path, site_class: type[Site] = Site) -> tuple[Site, Site]:
    a = site_class(tmp_path / "a", str(uuid.UUID(int=0xA << 120)), 10**12)
    b = site_class(tmp_path / "b", str(uuid.UUID(int=0xB << 120)), 10**12 + 500)
    a.apply(c.LinkSite(b.id, a.tick()))
    b.apply(c.LinkSite(a.id, b.tick()))
    return a, b


def apply_refusable(site: Site, command: object | None) -> None:
    """Apply `command` (None: nothing); refused by the namespace rules (EXDEV, EDQUOT...), like a
    user's call, it changes nothing and captures nothing: part of the workload, not a failure."""
    if command is not None:
        try:
            site.apply(command)
        except FsError:
            pass


def random_step(rng: random.Random, a: Site, b: Site, *, linked: bool = True,
                make: Callable[[random.Random, Site, float], object | None] =
                lambda rng, site, _roll: random_command(rng, site)) -> None:
    """One step of a random two-site run: while `linked`, a ship either way at random (a tenth of
    the steps each), else a command (`make`, given the step's roll) on either site."""
    roll = rng.random()
    if linked and roll < 0.1:
        ship(a, b, rng, forget=rng.random() < 0.5)
    elif linked and roll < 0.2:
        ship(b, a, rng, forget=rng.random() < 0.5)
    else:
        site = a if rng.random() < 0.5 else b
        apply_refusable(site, make(rng, site, roll))


def run(tmp_path: Path, seed: int, steps: int = 150, *, site_class: type[Site] = Site,
        make: Callable[[random.Random, Site, float], object | None] = lambda rng, site, _roll: random_command(rng, site),
        ) -> tuple[Site, Site]:
    """Random commands on both sites (`make`: one, given the step's roll, above 0.2) with
    shipping at random moments; then everything is shipped both ways."""
    rng = random.Random(seed)
    a, b = linked_pair(tmp_path, site_class)
    for _ in range(steps):
        random_step(rng, a, b, make=make)
    while ship(a, b) + ship(b, a):
        pass
    return a, b


def assert_sites_agree(a: Site, b: Site, seed: int) -> None:
    """Both sites show the same tree (link counts aside), list the same conflicts and keep the
    same losing contents. A file's link count includes a name inside a deleted directory until the
    directory is released, which each site does when it forgets the delete: compared once both have."""
    unlinked = [{path: fields[:4] + fields[5:] for path, fields in site.snapshot().items()} for site in (a, b)]
    differ = sorted(set(unlinked[0].items()) ^ set(unlinked[1].items()))
    assert not differ, f"seed {seed}: the sites differ at {differ[:6]}"
    assert conflict_keys(a) == conflict_keys(b), f"seed {seed}: the sites list different conflicts"
    assert kept_copies(a) == kept_copies(b), f"seed {seed}: the sites keep different losing contents"
    assert conflicts_folder(a) == conflicts_folder(b), f"seed {seed}: /.conflicts differs"


def conflict_keys(site: Site) -> set[tuple[str, str]]:
    """The open conflicts: (kind, losing version). Which ones were open for a while and settled
    since depends on the order things arrived in, so only the open ones must agree."""
    return {(r["kind"], r["loser"]) for r in site.conflicts() if r["open"]}


SEEDS = seeds.params("sites", 12, replay_var="AWSOMEFS_SITES_SEED", fixed=(258013144, 258014156, 258014451, 700001764))
"""Fresh each run (tests/support/seeds.py), and seeds that found bugs: 258013144 and 258014156, an
edit judged without a move one site had forgotten; 258014451, a directory released with an entry
moved in after; 700001764, an entry renamed to a name derived for another (test_sites_judging.py
and meta/sites/view.py's `_groups_deriving`)."""
MANY_SEEDS = seeds.fresh_range("sites-many", 1188)
"""The slow run's seeds, fresh each run: seeds 0..1199 passed before this was committed (the ones
that found the bugs of design note 49 are among them: 7, 59, 97, 107, 227, 234, 660)."""


def run_seeds(test: Callable[[Path, int], None], tmp_path: Path, chosen: range) -> None:
    """A seeded test over many seeds, every failing seed named (the slow suite's runs)."""
    failed = []
    for seed in chosen:
        try:
            test(tmp_path / str(seed), seed)
        except AssertionError as exc:
            failed.append(f"{exc}".splitlines()[0])
        else:
            shutil.rmtree(tmp_path / str(seed))
    assert not failed, seeds.failed(chosen, [f"{len(failed)} seeds failed (AWSOMEFS_SITES_SEED=n replays one):",
                                             *failed[:5]])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 1,188 seeds: 210 s on an idle 2-core machine, past 300 s loaded
def test_two_sites_converge_under_many_more_random_seeds(tmp_path: Path) -> None:
    run_seeds(test_two_sites_converge_under_random_namespace_and_attribute_changes, tmp_path, MANY_SEEDS)


@pytest.mark.parametrize("seed", SEEDS)
def test_two_sites_converge_under_random_namespace_and_attribute_changes(tmp_path: Path, seed: int) -> None:
    a, b = run(tmp_path, seed)
    assert_sites_agree(a, b, seed)
    for _ in range(3):  # quiet now: both sites forget everything, and release what was deleted
        ship(a, b, forget=True)
        ship(b, a, forget=True)
    differ = sorted(set(a.snapshot().items()) ^ set(b.snapshot().items()))
    assert not differ, f"seed {seed}: the sites differ after forgetting at {differ[:6]}"
    for site in (a, b):
        assert not site.read(lambda txn, s=site: s.sm.sites.kept_inodes(txn)), f"seed {seed}: deleted objects kept"
        assert not unreachable_inodes(site), f"seed {seed}: inodes neither reachable nor released"
    assert conflicts_folder(a) == conflicts_folder(b), f"seed {seed}: /.conflicts differs after forgetting"


def unreachable_inodes(site: Site) -> list[int]:
    """Inodes no path from the root reaches that are not handed to the orphan purge either."""
    def read(txn: Any) -> list[int]:
        reachable, pending = {ROOT_INO}, [ROOT_INO]
        while pending:
            for _name, child in site.sm.ns.names(txn, pending.pop()):
                if child not in reachable:
                    reachable.add(child)
                    if site.sm.ns.require_inode(txn, child).is_dir:
                        pending.append(child)
        orphans = {int.from_bytes(bytes(key), "big") for key, _ in txn.cursor(db=site.store.db["orphans"])}
        inodes = {int.from_bytes(bytes(key), "big") for key, _ in txn.cursor(db=site.store.db["inodes"])}
        return sorted(inodes - reachable - orphans)
    return site.read(read)


def conflicts_folder(site: Site) -> dict[bytes, tuple[Any, ...]]:
    """/.conflicts as a user lists it, name -> (size, block checksums): the same on both sites."""
    def read(txn: Any) -> dict[bytes, tuple[Any, ...]]:
        return {name: (site.sm.ns.require_inode(txn, ino).size, blocks_of(site, txn, ino))
                for name, ino in site.sm.ns.names(txn, 4)}
    return site.read(read)


def kept_copies(site: Site) -> dict[str, tuple[Any, ...]]:
    """What /.conflicts keeps of each open content conflict's loser: its size and block checksums."""
    def read(txn: Any) -> dict[str, tuple[Any, ...]]:
        kept = {}
        for record in site.sm.sites.conflicts(txn):
            if record["kind"] in ("content", "edit-delete") and record["open"]:
                ino = record["kept_ino"]
                inode = site.sm.ns.require_inode(txn, ino)
                assert site.sm.ns.lookup(txn, 4, bytes.fromhex(record["kept_as"]).rpartition(b"/")[2]) == ino
                kept[record["loser"]] = (inode.size, stat.S_IMODE(inode.mode), inode.uid, blocks_of(site, txn, ino))
        return kept
    return site.read(read)


def any_seed_differs(tmp_path: Path, seeds: int = 8) -> bool:
    for seed in range(seeds):
        a, b = run(tmp_path / f"planted{seed}", seed)
        if a.snapshot() != b.snapshot() or conflict_keys(a) != conflict_keys(b):
            return True
    return False


def test_planted_bug_applying_moves_in_arrival_order_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from awsomefsd.crdt.tree import ReplicatedTree

    def arrival_order(self: ReplicatedTree, move: Move) -> list[Any]:
        if self.log.entry_at(move.stamp) is None:  # no undo, no redo: done where it arrives
            self.log.append(self._do(move))  # type: ignore[attr-defined]
        return []
    monkeypatch.setattr(TableTree, "append", lambda self, entry: self.txn.put(
        entry.move.stamp.pack(), _pack_log_entry(entry), db=self.t.db["slog"]))
    monkeypatch.setattr(ReplicatedTree, "apply", arrival_order)
    assert any_seed_differs(tmp_path)


def test_planted_bug_last_arrival_wins_for_registers_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from awsomefsd.crdt.register import MultiValueRegister, Outcome

    def last_arrival(self: MultiValueRegister[Any], version: Any) -> Outcome[Any]:
        self._versions = [version]
        return Outcome(shown=True)
    monkeypatch.setattr(MultiValueRegister, "apply", last_arrival)
    assert any_seed_differs(tmp_path)


def test_a_run_makes_conflicts_of_every_kind_the_model_has(tmp_path: Path) -> None:
    """The random workload is not vacuous: over the seeds it makes move, attribute and xattr conflicts."""
    kinds: set[str] = set()
    for seed in range(30):
        a, _ = run(tmp_path / str(seed), seed)
        kinds |= {r["kind"] for r in a.conflicts()}
    assert {"move", "attributes", "xattr", "content"} <= kinds, kinds


def test_a_file_made_on_one_site_appears_on_the_other_with_its_attributes(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    d = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"docs", d, stat.S_IFDIR | 0o750, 7, 8, a.tick()))
    f = a.new_ino()
    a.apply(c.Mknod(d, b"x.txt", f, stat.S_IFREG | 0o640, 7, 8, a.tick()))
    a.apply(c.SetXattr(f, b"user.k", b"v", 0, a.tick()))
    a.apply(c.SetAttr(f, a.tick(), mtime_ns=123, atime_ns=456))
    assert ship(a, b) == 6  # two creates, two moves, an xattr, the attributes
    snap = b.snapshot()
    assert snap[b"/docs"][:4] == (stat.S_IFDIR, 0o750, 7, 8)
    assert snap[b"/docs/x.txt"][:6] == (stat.S_IFREG, 0o640, 7, 8, 1, (123, 456))
    assert snap[b"/docs/x.txt"][6] == ((b"user.k", b"v"),)
    assert ship(a, b) == 0, "nothing is sent twice"


def test_two_creates_of_one_name_keep_both_and_name_the_older_after_its_site(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    a.apply(c.Mknod(ROOT_INO, b"report", a.new_ino(), stat.S_IFREG | 0o644, 1, 1, a.tick()))
    b.apply(c.Mknod(ROOT_INO, b"report", b.new_ino(), stat.S_IFREG | 0o600, 2, 2, b.tick()))
    ship(a, b)
    ship(b, a)
    names_a, names_b = set(a.snapshot()), set(b.snapshot())
    assert names_a == names_b
    assert b"/report" in names_a and len(names_a) == 2
    other = next(n for n in names_a if n != b"/report")
    assert other.startswith(b"/report.conflict-" + a.id.hex()[:8].encode()), other  # a's is older
    assert a.snapshot()[b"/report"][2] == 2, "the newer create (b's) keeps the name"


def test_concurrent_moves_that_would_make_a_cycle_end_the_same_on_both_sites(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    x, y = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"x", x, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    a.apply(c.Mknod(ROOT_INO, b"y", y, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    bx = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"x"))
    by = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"y"))
    a.apply(c.Rename(ROOT_INO, b"x", y, b"x", 0, a.tick()))  # x into y on a
    b.apply(c.Rename(ROOT_INO, b"y", bx, b"y", 0, b.tick()))  # y into x on b
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot()
    assert set(a.snapshot()) in ({b"/x", b"/x/y"}, {b"/y", b"/y/x"})
    (skipped,) = a.conflicts()
    assert by is not None and b.conflicts() == [skipped], "the skipped move is listed alike on both sites"
    assert skipped["kind"] == "skipped-move" and skipped["open"]
    # the log forgets it (both sites past it): still listed, the same
    through = max(a.outbox_after(None)[-1][0], b.outbox_after(None)[-1][0])
    for site in (a, b):
        site.apply(c.ForgetSite(through.pack(), site.tick()))
    assert a.conflicts() == b.conflicts() == [skipped]
    with pytest.raises(FsError) as info:
        a.apply(c.ResolveConflict(bytes.fromhex(skipped["key"]), "loser", a.tick()))
    assert info.value.errno == errno.EINVAL, "making it again would still make a cycle"
    a.apply(c.ResolveConflict(bytes.fromhex(skipped["key"]), "winner", a.tick()))
    ship(a, b)
    assert not [r for r in a.conflicts() + b.conflicts() if r["open"]]


def test_a_skipped_move_resolved_while_the_log_holds_it_closes_on_both_sites(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    x, y = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"x", x, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    a.apply(c.Mknod(ROOT_INO, b"y", y, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    a.apply(c.Rename(ROOT_INO, b"x", y, b"x", 0, a.tick()))
    b.apply(c.Rename(ROOT_INO, b"y", b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"x")), b"y", 0, b.tick()))
    ship(a, b)
    ship(b, a)
    (skipped,) = a.conflicts()
    a.apply(c.ResolveConflict(bytes.fromhex(skipped["key"]), "winner", a.tick()))
    ship(a, b)
    for site in (a, b):
        (closed,) = site.conflicts()
        assert not closed["open"] and closed["kept"] == "winner", site.conflicts()


def test_a_delete_loses_to_a_concurrent_rename_with_a_later_stamp_and_the_file_survives(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    a.apply(c.SetXattr(f, b"user.keep", b"me", 0, a.tick()))
    ship(a, b)
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    b.now = a.now + 10_000  # b's rename is later
    b.apply(c.Rename(ROOT_INO, b"f", ROOT_INO, b"g", 0, b.tick()))
    ship(a, b)
    ship(b, a)
    assert set(a.snapshot()) == set(b.snapshot()) == {b"/g"}
    assert a.snapshot()[b"/g"][6] == ((b"user.keep", b"me"),), "the deleted-then-renamed file kept its xattr"
    assert a.read(lambda txn: txn.get((f).to_bytes(8, "big"), db=a.store.db["orphans"])) is None


def test_two_deletes_of_one_file_are_no_conflict(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    a.apply(c.Mknod(ROOT_INO, b"f", a.new_ino(), stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    b.apply(c.Unlink(ROOT_INO, b"f", False, b.tick()))
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot() == {}
    assert a.conflicts() == b.conflicts() == []


def test_a_peer_that_sends_garbage_or_an_unknown_format_changes_nothing(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    a.apply(c.Mknod(ROOT_INO, b"one", a.new_ino(), stat.S_IFREG | 0o644, 0, 0, a.tick()))
    good = [raw for _, raw in a.outbox_after(None)]
    before = b.snapshot()
    for bad in (b"not json", good[0].replace(b'"v":1', b'"v":9'), good[-1].replace(b'"name":"6f6e65"', b'"name":"2f"')):
        with pytest.raises(FsError) as info:
            b.apply(c.ApplyRemote(a.id, b"", (*good, bad), (), (), b.tick()))
        assert info.value.errno == errno.EINVAL
    assert b.snapshot() == before, "a batch with one bad operation applies nothing"
    with pytest.raises(FsError) as info:
        b.apply(c.ApplyRemote(uuid.uuid4().bytes, b"", tuple(good), (), (), b.tick()))
    assert info.value.errno == errno.EPERM
    ship(a, b)
    with pytest.raises(FsError) as info:  # a resend of what was applied is refused, not applied twice
        b.apply(c.ApplyRemote(a.id, b"", tuple(good), (), (), b.tick()))
    assert info.value.errno == errno.ESTALE


def write(site: Site, ino: int, first: int, count: int, seed: int) -> bytes:
    checksums = random.Random(seed).randbytes(4 * count)
    site.apply(c.WriteData(ino, (Extent(first, site.take_blocks(count), count, checksums),), (first + count) * 4096,
                           site.tick()))
    return checksums


@pytest.mark.parametrize("edit_first", [True, False], ids=["edit-then-delete", "delete-then-edit"])
def test_an_edit_against_a_delete_keeps_the_edit_on_both_sites(tmp_path: Path, edit_first: bool) -> None:
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o640, 7, 7, a.tick()))
    write(a, f, 0, 1, 1)
    ship(a, b)
    bf = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f"))
    if edit_first:
        edited = write(b, bf, 0, 2, 2)
        a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    else:
        a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
        edited = write(b, bf, 0, 2, 2)
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot() and b"/f" not in a.snapshot(), "the delete stands"
    assert kept_copies(a) == kept_copies(b)
    (kept,) = kept_copies(a).values()
    assert kept[3] == ((0, edited[:4]), (1, edited[4:])), "the edit is kept whole"
    assert {r["kind"] for r in a.conflicts()} == {"edit-delete"}


def file_with_two_names(site: Site) -> int:
    """A regular file at /f and, hard-linked, /g; its inode."""
    ino = site.new_ino()
    site.apply(c.Mknod(ROOT_INO, b"f", ino, stat.S_IFREG | 0o644, 0, 0, site.tick()))
    site.apply(c.Link(ino, ROOT_INO, b"g", site.tick()))
    return ino


def test_an_edit_is_kept_when_another_site_took_a_name_of_the_file_without_knowing_it(tmp_path: Path) -> None:
    """A file with two names: site a removes one before it hears of b's edit; b, which made the
    edit, removes the other afterwards, knowingly. a's user never chose to discard the edit."""
    a, b = linked_pair(tmp_path)
    f = file_with_two_names(a)
    write(a, f, 0, 1, 1)
    ship(a, b)
    a.apply(c.Unlink(ROOT_INO, b"g", False, a.tick()))
    bf = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f"))
    b.now += 10**9  # b's clock runs ahead: its knowing delete is the later one by stamp
    edited = write(b, bf, 0, 1, 2)
    b.apply(c.Unlink(ROOT_INO, b"f", False, b.tick()))
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot() == {}, "both deletes stand"
    assert kept_copies(a) == kept_copies(b)
    (kept,) = kept_copies(a).values()
    assert kept[3] == ((0, edited),), "the edit is kept"
    assert [r["kind"] for r in a.conflicts() if r["open"]] == ["edit-delete"]


def test_a_delete_the_editor_had_seen_does_not_keep_the_edit(tmp_path: Path) -> None:
    """b removes one name (g) of a file; a, having seen that, edits the file and removes its
    other name (f); b removes f too, concurrently, and loses to a's later delete. Nothing was
    overridden unknowingly: no edit is kept. (Counting g's removal, which a had seen, made the
    answer depend on whether the log still held it: the random two-site test, seed 13.)"""
    a, b = linked_pair(tmp_path)
    f = file_with_two_names(a)
    ship(a, b)
    b.apply(c.Unlink(ROOT_INO, b"g", False, b.tick()))
    ship(b, a)
    b.apply(c.Unlink(ROOT_INO, b"f", False, b.tick()))
    a.now = b.now + 10_000  # a's delete is the later one
    write(a, f, 0, 1, 4)
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot() == {}
    assert kept_copies(a) == kept_copies(b) == {}
    assert not [r for r in a.conflicts() + b.conflicts() if r["open"] and r["kind"] == "edit-delete"]


def test_a_file_written_inside_a_directory_the_other_site_removed_is_kept(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    d = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"d", d, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    bd = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"d"))
    g = b.new_ino()
    b.apply(c.Mknod(bd, b"g", g, stat.S_IFREG | 0o644, 0, 0, b.tick()))
    written = write(b, g, 0, 2, 3)
    a.apply(c.Unlink(ROOT_INO, b"d", True, a.tick()))
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot() == {}, "the directory's removal stands"
    assert kept_copies(a) == kept_copies(b)
    (kept,) = kept_copies(a).values()
    assert kept[3] == ((0, written[:4]), (1, written[4:])), "what was written inside it is kept"


def test_a_file_made_in_a_directory_the_other_site_moved_into_a_removed_one_is_kept(tmp_path: Path) -> None:
    """a removes the empty directory /x; b, not knowing, moves /y into it; a, having removed /x
    and not knowing of the move, makes /y/f. The move took f's path (into a removed directory)
    without having seen f: f is kept on both sites. The removal alone was seen by f's writer, so
    judging the removal only lost f without a trace (the random two-site test, seed 4)."""
    a, b = linked_pair(tmp_path)
    x, y = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"x", x, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    a.apply(c.Mknod(ROOT_INO, b"y", y, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    a.apply(c.Unlink(ROOT_INO, b"x", True, a.tick()))
    bx = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"x"))
    b.apply(c.Rename(ROOT_INO, b"y", bx, b"y", 0, b.tick()))
    f = a.new_ino()
    a.apply(c.Mknod(y, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    written = write(a, f, 0, 1, 4)
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot() == {}, "the removal stands, and takes /y with it"
    assert kept_copies(a) == kept_copies(b)
    assert [blocks for _size, _mode, _uid, blocks in kept_copies(a).values()] == [((0, written),)], "f is kept"


def test_one_copy_kept_for_an_edit_and_for_a_content_that_lost_stays_while_either_record_holds_it(
        tmp_path: Path) -> None:
    """a edits f; b, not knowing, removes f and then writes it through a descriptor still open,
    later by stamp. On a, the edit is first kept against the delete, then it is also a content
    that lost to b's write, while the delete stops counting (b's write saw it): one copy served
    both records, and closing the first dropped it from under the second (the random two-site
    test's last round)."""
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    edit = write(a, f, 0, 1, 1)
    bf = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f"))
    b.now = a.now + 10_000
    b.apply(c.Unlink(ROOT_INO, b"f", False, b.tick()))
    write(b, bf, 0, 2, 2)
    ship(b, a)
    ship(a, b)
    assert a.snapshot() == b.snapshot() == {}
    assert conflicts_folder(a) == conflicts_folder(b)
    assert ((0, edit),) in [blocks for _size, blocks in conflicts_folder(a).values()], "a's edit is kept"
    assert kept_copies(a) == kept_copies(b)


def test_a_losing_content_overwritten_by_its_own_site_goes_on_both_sites_whoever_settled_it_first(
        tmp_path: Path) -> None:
    """a's write lost to b's, kept on both sites. Then each site writes the file again, having
    seen both: on a, a's own write settles the loser (its writer overwrote it knowingly: the copy
    goes); on b, b's write settles it first, and a's arrives after. The copy goes on b too."""
    a, b, f = content_conflict(tmp_path)
    assert len(conflicts_folder(a)) == len(conflicts_folder(b)) == 1
    write(a, f, 0, 1, 5)
    write(b, b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f")), 0, 1, 6)
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot()
    assert conflicts_folder(a) == conflicts_folder(b)
    assert len(conflicts_folder(a)) == 1, "only the newest conflict's loser is kept"


def test_a_file_is_judged_again_when_the_delete_that_took_its_path_changes(tmp_path: Path) -> None:
    """b moves directory A (holding a's new file F) into directory B and removes A; a, not
    knowing, removes B (empty on a) and then writes F. On a, F first lost its path to a's own
    removal of B, which the write had seen: nothing to keep. Then b's removal of A arrives: F's
    path went with A, a delete the write had not seen, and A stays out of reach all along. The
    write is kept on both sites (the random test, seed 660 with forgetting, kept it on b only)."""
    a, b = linked_pair(tmp_path)
    big_b = b.new_ino()
    b.apply(c.Mknod(ROOT_INO, b"b", big_b, stat.S_IFDIR | 0o755, 0, 0, b.tick()))
    ship(b, a)
    big_a, f = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"d", big_a, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    a.apply(c.Mknod(big_a, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    b.now = a.now
    b_a = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"d"))
    b.apply(c.Rename(ROOT_INO, b"d", big_b, b"a", 0, b.tick()))
    b.apply(c.Unlink(big_b, b"a", True, b.tick()))
    a.now = b.now + 10_000
    a_b = a.read(lambda txn: a.sm.ns.lookup(txn, ROOT_INO, b"b"))
    a.apply(c.Unlink(ROOT_INO, b"b", True, a.tick()))
    edited = write(a, f, 0, 1, 11)
    assert b_a is not None and a_b is not None
    ship(b, a)
    ship(a, b)
    assert a.snapshot() == b.snapshot() == {}
    assert conflicts_folder(a) == conflicts_folder(b)
    assert [blocks for _size, blocks in conflicts_folder(a).values()] == [((0, edited),)], "a's write is kept"


def test_a_write_through_a_descriptor_replaces_a_kept_edit_on_both_sites(tmp_path: Path) -> None:
    """b's edit of f was kept against a's unlink of f. Then b writes f again through a descriptor
    still open, having seen the unlink: that content replaces the kept one, on a when it arrives
    and on b at once, though f still counts a name (g) inside a directory a removed (the random
    two-site test: b only judged such a write when the file's link count was 0, and kept what a
    dropped)."""
    a, b = linked_pair(tmp_path)
    y, f = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"y", y, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    by, bf = (b.read(lambda txn, n=n: b.sm.ns.lookup(txn, ROOT_INO, n)) for n in (b"y", b"f"))
    b.apply(c.Link(bf, by, b"g", b.tick()))
    write(b, bf, 0, 1, 12)
    a.apply(c.Unlink(ROOT_INO, b"y", True, a.tick()))
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    ship(a, b)
    assert [r["kind"] for r in open_conflicts(b)] == ["edit-delete"], "b's edit kept against the unlink"
    assert b.read(lambda txn: b.sm.ns.require_inode(txn, bf)).nlink == 1, "g, inside the removed y, still counts"
    write(b, bf, 0, 1, 13)
    ship(b, a)
    ship(a, b)
    assert open_conflicts(a) == open_conflicts(b) == []
    assert conflicts_folder(a) == conflicts_folder(b) == {}


def test_a_content_that_lost_to_a_version_never_sent_is_kept_on_both_sites(tmp_path: Path) -> None:
    """b writes f (L); a, its clock ahead, writes f too (V1) before L arrives: V1 wins, a keeps
    L in /.conflicts. a writes f again (V2), having seen both. V1 then ships as Superseded (only
    the newest bytes travel) and b never sees the version L lost to; it learns it from V1's
    stamp and V2's knowledge, and keeps L too (the random test, seed 7: only a kept it)."""
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    lost = write(b, b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f")), 0, 1, 14)
    a.now = b.now + 10_000
    write(a, f, 0, 1, 15)
    ship(b, a)
    write(a, f, 0, 1, 16)
    sent = [o.decode(a.read(lambda txn, raw=raw: a.sm.sites.shipping(txn, raw))[0]) for _, raw in a.outbox_after(None)]
    assert any(isinstance(op, o.Superseded) for op in sent), "V1 goes without its bytes"
    ship(a, b)
    assert a.snapshot() == b.snapshot()
    assert conflicts_folder(a) == conflicts_folder(b)
    assert [blocks for _size, blocks in conflicts_folder(b).values()] == [((0, lost),)], "L is kept on both"


def content_conflict(tmp_path: Path) -> tuple[Site, Site, int]:
    """Both sites write file f not knowing of the other's write: b's (later) wins, a's is kept."""
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    write(a, f, 0, 1, 1)
    b.now = a.now + 10_000
    write(b, b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f")), 0, 1, 2)
    ship(a, b)
    ship(b, a)
    return a, b, f


def open_conflicts(site: Site) -> list[dict[str, Any]]:
    return [r for r in site.conflicts() if r["open"]]


def test_a_conflict_lists_both_versions_alike_on_both_sites(tmp_path: Path) -> None:
    a, b, _f = content_conflict(tmp_path)
    (ra,), (rb,) = open_conflicts(a), open_conflicts(b)
    fields = ("id", "kind", "winner", "loser", "winner_size", "winner_hash", "loser_size", "loser_hash", "path")
    assert {k: ra[k] for k in fields} == {k: rb[k] for k in fields}
    assert ra["path"] == "/f" and ra["winner_size"] == ra["loser_size"] == 4096
    assert ra["winner_hash"] != ra["loser_hash"], "two different contents"


@pytest.mark.parametrize("keep", ["winner", "both"])
def test_resolving_a_conflict_closes_it_on_both_sites_and_drops_the_kept_copy(tmp_path: Path, keep: str) -> None:
    a, b, _f = content_conflict(tmp_path)
    (record,) = open_conflicts(a)
    a.apply(c.ResolveConflict(bytes.fromhex(record["key"]), keep, a.tick()))
    ship(a, b)
    for site in (a, b):
        (closed,) = site.conflicts()
        assert not closed["open"] and closed["kept"] == keep
        assert site.read(lambda txn, s=site: list(s.sm.ns.names(txn, 4))) == [], "the copy in /.conflicts went"
    with pytest.raises(FsError) as info:
        b.apply(c.ResolveConflict(bytes.fromhex(record["key"]), "loser", b.tick()))
    assert info.value.errno == errno.EALREADY, "resolved once, on either site"
    assert a.snapshot() == b.snapshot()


def test_a_move_conflict_resolved_for_the_loser_moves_the_object_there_on_both_sites(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    a.apply(c.Rename(ROOT_INO, b"f", ROOT_INO, b"by-a", 0, a.tick()))
    b.now = a.now + 10_000
    b.apply(c.Rename(ROOT_INO, b"f", ROOT_INO, b"by-b", 0, b.tick()))
    ship(a, b)
    ship(b, a)
    assert set(a.snapshot()) == {b"/by-b"}
    (record,) = open_conflicts(b)
    assert record["loser_path"] == "/by-a" and not record["loser_deletes"]
    with pytest.raises(FsError) as info:
        b.apply(c.ResolveConflict(bytes.fromhex(record["key"]), "both", b.tick()))
    assert info.value.errno == errno.EINVAL, "a move has one outcome"
    b.apply(c.ResolveConflict(bytes.fromhex(record["key"]), "loser", b.tick()))
    ship(b, a)
    assert set(a.snapshot()) == set(b.snapshot()) == {b"/by-a"}
    assert not open_conflicts(a) and not open_conflicts(b)


def test_a_delete_that_lost_to_a_rename_can_be_kept(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    b.now = a.now + 10_000
    b.apply(c.Rename(ROOT_INO, b"f", ROOT_INO, b"g", 0, b.tick()))
    ship(a, b)
    ship(b, a)
    (record,) = open_conflicts(a)
    assert record["loser_deletes"] and record["loser_path"] is None
    a.apply(c.ResolveConflict(bytes.fromhex(record["key"]), "loser", a.tick()))
    ship(a, b)
    assert a.snapshot() == b.snapshot() == {}, "the delete stands now, on both sites"


def test_linking_twice_or_to_itself_is_refused(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    with pytest.raises(FsError) as info:
        a.apply(c.LinkSite(b.id, a.tick()))
    assert info.value.errno == errno.EEXIST
    a.apply(c.UnlinkSite(a.tick()))
    with pytest.raises(FsError):
        a.apply(c.LinkSite(a.id, a.tick()))


def test_linking_a_site_with_data_ships_it_as_the_initial_sync(tmp_path: Path) -> None:
    a = Site(tmp_path / "a", str(uuid.UUID(int=0xA << 120)), 10**12)
    b = Site(tmp_path / "b", str(uuid.UUID(int=0xB << 120)), 10**12 + 500)
    d = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"d", d, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    f = a.new_ino()
    a.apply(c.Mknod(d, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    a.apply(c.Link(f, ROOT_INO, b"hard", a.tick()))
    a.apply(c.SetXattr(f, b"user.x", b"1", 0, a.tick()))
    a.apply(c.LinkSite(b.id, a.tick()))
    b.apply(c.LinkSite(a.id, b.tick()))
    ship(a, b)
    assert a.snapshot() == b.snapshot()
    assert b.snapshot()[b"/hard"][4] == 2


def test_forgetting_past_a_delete_releases_the_kept_inode(tmp_path: Path) -> None:
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    orphans = a.store.db["orphans"]
    assert a.read(lambda txn: txn.get(f.to_bytes(8, "big"), db=orphans)) is None, "kept while it may come back"
    assert a.apply(c.Purge(f, a.tick())) is False, "a purge (a handle's last close) leaves a kept inode alone"
    assert a.read(lambda txn: a.sm.ns.get_inode(txn, f)) is not None
    ship(a, b)
    last = a.outbox_after(None)[-1][0]
    a.apply(c.ForgetSite(last.pack(), a.tick()))
    assert a.read(lambda txn: txn.get(f.to_bytes(8, "big"), db=orphans)) is not None, "released to the purge"
    assert a.outbox_after(None) == []


def test_forgetting_one_deleted_name_keeps_a_file_whose_other_name_went_later(tmp_path: Path) -> None:
    """A file with two names: one deleted and forgotten (both sites past it), the other deleted
    after a write, neither shipped yet. The file is still the tree's: its write ships with its
    bytes (found by the random two-site test: the file was released, its write had no bytes to
    send, and the link stalled)."""
    a, b = linked_pair(tmp_path)
    f = file_with_two_names(a)
    a.apply(c.Unlink(ROOT_INO, b"g", False, a.tick()))
    ship(a, b)
    through = a.outbox_after(None)[-1][0]
    write(a, f, 0, 1, 7)
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    a.apply(c.ForgetSite(through.pack(), a.tick()))
    assert a.read(lambda txn: a.sm.sites.keeps(txn, f)), "released while a deleted name may come back"
    (content,) = [raw for _, raw in a.outbox_after(through) if isinstance(o.decode(raw), o.ContentSet)]
    sent, ino = a.read(lambda txn: a.sm.sites.shipping(txn, content))
    assert ino == f and isinstance(o.decode(sent), o.ContentSet)
    ship(a, b)
    assert a.snapshot() == b.snapshot() == {}


def test_a_site_forgets_no_delete_its_own_unshipped_edit_is_concurrent_with(tmp_path: Path) -> None:
    """b, its clock ahead, changes something (q) and then writes f, before a's delete of f
    arrives; a applies q and acknowledges it. The horizon is then past the delete, yet b's write,
    not shipped yet, never saw it: b must keep the delete and the file until the write is judged
    against it on a too. (Found with forgetting in the random test: b released f, its write went
    as Superseded, with no bytes, and only b kept the edit.)"""
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    bf = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f"))
    b.now = a.now + 10**9
    b.apply(c.SetAttr(bf, b.tick(), mode=0o600))
    edit = write(b, bf, 0, 1, 8)
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    ship(a, b, forget=True)
    ship(b, a, count=1, forget=True)  # only the chmod: a acknowledges it, and b forgets what it may
    ship(b, a, forget=True)
    ship(a, b, forget=True)
    assert a.snapshot() == b.snapshot() == {}, "the delete stands"
    assert conflicts_folder(a) == conflicts_folder(b)
    assert [blocks for _size, blocks in conflicts_folder(a).values()] == [((0, edit),)], "b's write is kept"


def test_an_edit_is_kept_against_a_delete_of_another_name_the_log_has_forgotten(tmp_path: Path) -> None:
    """As the test above, with both logs past b's removal of g before a removes f: the object
    keeps the move that took g (the random test, seed 227 with forgetting: one site had
    forgotten it and kept nothing, the other had not and kept the edit)."""
    a, b = linked_pair(tmp_path)
    f = file_with_two_names(a)
    ship(a, b)
    edited = write(a, f, 0, 1, 9)
    b.apply(c.Unlink(ROOT_INO, b"g", False, b.tick()))
    removal = b.read(b.sm.sites.head)
    for _ in range(3):
        ship(a, b, forget=True)
        ship(b, a, forget=True)
    for site in (a, b):
        forgotten = site.read(lambda txn, s=site: txn.get(b"horizon", db=s.store.db["sites"]))
        assert forgotten is not None and Stamp.unpack(forgotten) >= removal, "both logs forgot the removal"
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot() == {}
    assert conflicts_folder(a) == conflicts_folder(b)
    assert [blocks for _size, blocks in conflicts_folder(a).values()] == [((0, edited),)], "the edit is kept"


def test_unlinked_sites_capture_nothing(tmp_path: Path) -> None:
    a = Site(tmp_path / "a", str(uuid.UUID(int=0xA << 120)), 10**12)
    a.apply(c.Mknod(ROOT_INO, b"f", a.new_ino(), stat.S_IFREG | 0o644, 0, 0, a.tick()))
    assert a.outbox_after(None) == []


def test_every_operation_kind_round_trips_and_decoding_checks_fields() -> None:
    site = uuid.uuid4().bytes
    stamp = Stamp(5, 1, site)
    seen = {uuid.uuid4().bytes: Stamp(3, 0, site)}
    gid = o.global_id(site, 9)
    for op in (o.Created(stamp, gid, stat.S_IFLNK | 0o777, 1, 2, 0, b"target", 7, seen),
               o.Moved(stamp, gid, gid, b"name", gid, seen), o.AttrsSet(stamp, gid, 0o644, 1, 2, 3, 4),
               o.XattrSet(stamp, gid, b"user.a", None), o.XattrSet(stamp, gid, b"user.a", b"\x00v"),
               o.ContentSet(stamp, gid, 10, 11), o.ContentSet(stamp, gid, 10, 11, 0o640, 5, 6, seen),
               o.Superseded(stamp, gid, seen), o.Resolved(stamp, stamp.pack() + b"c", "both", seen),
               o.VolumeSet(stamp, gid, b"pvc-1", 1 << 30, 100, seen)):
        assert o.decode(o.encode(op)) == op
    with pytest.raises(o.BadOperation):
        o.decode(o.encode(o.AttrsSet(stamp, gid, 0o644, 1, 2, 3, 4)).replace(b'"uid":1', b'"uid":-1'))
    with pytest.raises(o.BadOperation):
        o.decode(o.encode(o.Resolved(stamp, stamp.pack() + b"c", "both")).replace(b'"both"', b'"neither"'))
    assert site_of_cluster(str(uuid.UUID(bytes=site))) == site


def test_a_batch_refused_half_way_leaves_no_trace(tmp_path: Path) -> None:
    """An operation that fails after others of its batch wrote (here: an xattr for a file whose
    inode vanished, an invariant broken behind the state machine's back) takes the whole batch
    back, the space it took and the cursor too."""
    a, b = linked_pair(tmp_path)
    f1, f2 = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f1", f1, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    a.apply(c.Mknod(ROOT_INO, b"f2", f2, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    with b.store.env.begin(write=True) as txn:
        b.sm.ns.delete_inode(txn, b.sm.ns.lookup(txn, ROOT_INO, b"f2") or 0)
    write(a, f1, 0, 2, 7)
    a.apply(c.SetAttr(f1, a.tick(), mode=0o600))
    a.apply(c.SetXattr(f2, b"user.x", b"1", 0, a.tick()))

    def f1_at_b() -> tuple[int, int]:
        inode = b.read(lambda txn: b.sm.ns.require_inode(txn, b.sm.ns.lookup(txn, ROOT_INO, b"f1") or 0))
        return inode.mode, inode.size
    before, free_before, cursor = f1_at_b(), b.sm.space.mirror.free_blocks, b.applied_from_peer()
    with pytest.raises(FsError) as info:
        ship(a, b)
    assert "applying XattrSet" in str(info.value)
    assert f1_at_b() == before, "the content and the mode applied before the failure were taken back"
    assert b.sm.space.mirror.free_blocks == free_before, "and the blocks the content took"
    assert b.applied_from_peer() == cursor


def _free(site: Site, block: int) -> bool:
    return site.read(lambda txn: any(start <= block < start + n for start, n in site.sm.space.free_extents(txn)))


def _map(site: Site, ino: int) -> list[Extent]:
    return site.read(lambda txn: list(all_extents(txn, site.store.db["fmap"], ino)))


def test_a_delta_shares_the_blocks_the_receiving_file_holds_and_refuses_ones_it_moved(tmp_path: Path) -> None:
    """Delta transfer (design note 50), in the state machine: a version of a's file that changed
    one block arrives at b as that block, staged, and the rest shared from b's own file; b then
    shows a's bytes, and letting go of b's old version frees only the block it replaced. Shared
    extents that are not what b's map holds are refused (EAGAIN) with nothing applied."""
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    write(a, f, 0, 8, 1)
    ship(a, b)
    bf = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f"))
    (old,) = _map(b, bf)
    write(a, f, 3, 1, 2)  # one block changed on a
    pending = a.outbox_after(b.applied_from_peer())
    operations = tuple(a.read(lambda txn, raw=raw: a.sm.sites.shipping(txn, raw))[0] for _, raw in pending)
    assert [type(o.decode(raw)) for raw in operations] == [o.ContentSet]
    changed = next(e for e in _map(a, f) if e.file_block == 3)
    fresh = (Extent(3, b.take_blocks(1), 1, changed.checksums),)

    def apply(shared: tuple[Extent, ...]) -> None:
        after = b.applied_from_peer()
        assert after is not None
        b.apply(c.ApplyRemoteSharing(a.id, after.pack(), operations, fresh, (1,), shared, (len(shared),), b.tick()))

    moved = (old.slice(0, 3), Extent(4, old.dev_block + 5, 4, old.checksums[16:]))  # not where b has them
    with pytest.raises(FsError) as refused:
        apply(moved)
    assert refused.value.errno == errno.EAGAIN
    assert _map(b, bf) == [old], "a refused batch changed nothing"
    apply((old.slice(0, 3), old.slice(4, 8)))
    assert b.read(lambda txn: blocks_of(b, txn, bf)) == a.read(lambda txn: blocks_of(a, txn, f))
    b.apply(c.ReclaimFrees(b.tick() + 10**9))
    assert _free(b, old.dev_block + 3), "the replaced block is freed"
    assert not any(_free(b, old.dev_block + i) for i in (0, 1, 2, 4, 5, 6, 7)), "a shared block was freed"
    assert not _free(b, fresh[0].dev_block)
    # the next whole version lets go of the shared blocks too: they are freed then, once
    write(a, f, 0, 8, 3)
    ship(a, b)
    b.apply(c.ReclaimFrees(b.tick() + 10**9))
    assert all(_free(b, old.dev_block + i) for i in range(8)) and _free(b, fresh[0].dev_block)


@pytest.mark.parametrize("rename_wins", [True, False])
def test_a_rename_that_wins_over_a_knowing_delete_keeps_the_file_its_directory_removal_takes(
        tmp_path: Path, rename_wins: bool) -> None:
    """b writes /d/f and removes /d with it, knowingly; a, not knowing, renames /d/f to /d/g. A
    later rename wins over b's unlink, and b's removal of /d then takes the path of a file it
    had not seen renamed: its content is kept. An earlier rename loses to the unlink: a listed
    move conflict, and the delete b made knowingly keeps nothing."""
    a, b = linked_pair(tmp_path)
    d, f = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"d", d, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    a.apply(c.Mknod(d, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    write(a, f, 0, 1, 1)
    ship(a, b)
    bd = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"d"))
    bf = b.read(lambda txn: b.sm.ns.lookup(txn, bd, b"f"))
    if rename_wins:
        a.now = b.now + 10_000_000
    else:
        b.now = a.now + 10_000_000
    written = write(b, bf, 0, 1, 2)
    b.apply(c.Unlink(bd, b"f", False, b.tick()))
    b.apply(c.Unlink(ROOT_INO, b"d", True, b.tick()))
    a.apply(c.Rename(d, b"f", d, b"g", 0, a.tick()))
    ship(a, b)
    ship(b, a)
    ship(a, b)
    assert a.snapshot() == b.snapshot() == {}
    assert kept_copies(a) == kept_copies(b)
    kinds = sorted(record["kind"] for record in a.conflicts())
    if rename_wins:
        assert [blocks for _size, _mode, _uid, blocks in kept_copies(a).values()] == [((0, written),)]
        assert kinds == ["edit-delete", "move"]
    else:
        assert kept_copies(a) == {}
        assert kinds == ["move"]


def test_a_batch_changing_what_another_member_holds_is_refused_whole(tmp_path: Path) -> None:
    """On a cluster, a member may hold a directory's delegation (or a file's write lease) and
    have acknowledged changes there the log has not seen: another member's ApplyRemote that
    changes it is refused whole (`Delegated`, as a local change would be), and applies once
    proposed by the holder (the receiving service takes the delegation and proposes again)."""
    a, b = linked_pair(tmp_path)
    a.apply(cc.InitCluster(b"cert", b"key", b"v" * 48, 3, 256, 1000, 10, 1, "n1", "10.0.0.1:7470", "10.0.0.1:7471",
                          a.tick()))
    assert a.apply(cc.AddMember("n2", "10.0.0.2:7470", "10.0.0.2:7471", a.tick())) == 2
    b.apply(c.Mknod(ROOT_INO, b"from-b", b.new_ino(), stat.S_IFREG | 0o644, 0, 0, b.tick()))
    raws = tuple(raw for _, raw in b.outbox_after(None))
    batch = c.ApplyRemote(b.id, b"", raws, (), (), a.tick())
    assert a.apply(cc.AcquireWriteLease(ROOT_INO, 2, 1)) == 2  # node 2 holds the root's delegation
    before = a.snapshot()
    with pytest.raises(Delegated) as refused:
        a.apply(c.Fenced(1, 1, (batch,)))
    assert (refused.value.directory, refused.value.holder) == (ROOT_INO, 2)
    assert a.snapshot() == before and a.applied_from_peer() is None, "a refused batch left something"
    a.apply(c.Fenced(2, 1, (batch,)))
    assert b"/from-b" in a.snapshot()


def test_a_resolution_moving_what_another_member_holds_is_refused_whole(tmp_path: Path) -> None:
    """Keeping a losing move moves the file again: on a cluster, not in a directory another
    member holds (it may have acknowledged changes there); refused whole, applied by the holder."""
    a, b = linked_pair(tmp_path)
    b.apply(cc.InitCluster(b"cert", b"key", b"v" * 48, 3, 256, 1000, 10, 1, "n1", "10.0.0.1:7470", "10.0.0.1:7471",
                          b.tick()))
    assert b.apply(cc.AddMember("n2", "10.0.0.2:7470", "10.0.0.2:7471", b.tick())) == 2
    a.apply(c.Mknod(ROOT_INO, b"f", a.new_ino(), stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    a.apply(c.Rename(ROOT_INO, b"f", ROOT_INO, b"by-a", 0, a.tick()))
    b.now = a.now + 10_000
    b.apply(c.Rename(ROOT_INO, b"f", ROOT_INO, b"by-b", 0, b.tick()))
    ship(a, b)
    (record,) = open_conflicts(b)
    resolution = c.ResolveConflict(bytes.fromhex(record["key"]), "loser", b.tick())
    assert b.apply(cc.AcquireWriteLease(ROOT_INO, 2, 1)) == 2
    before = b.snapshot()
    with pytest.raises(Delegated) as refused:
        b.apply(c.Fenced(1, 1, (resolution,)))
    assert (refused.value.directory, refused.value.holder) == (ROOT_INO, 2)
    assert b.snapshot() == before and open_conflicts(b) == [record], "a refused resolution left something"
    b.apply(c.Fenced(2, 1, (resolution,)))
    assert set(b.snapshot()) == {b"/by-a"} and not open_conflicts(b)


def test_a_name_lost_with_a_released_directory_still_counts_when_the_file_loses_its_last(tmp_path: Path) -> None:
    """a links /f into /d as /d/a; b, not knowing, writes f and removes /d (empty there). a forgets
    the removal first (releasing /d, and /d/a with it) and then unlinks /f, knowing b's write.
    b's write was cut off from /d/a unknowingly: b keeps it when a's unlink arrives, so a must
    keep it too, though it forgot that path (found by the random test with volumes, seed 287)."""
    a, b = linked_pair(tmp_path)
    d, f = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"d", d, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    write(a, f, 0, 1, 1)
    ship(a, b)
    bf, bd = b.read(lambda txn: (b.sm.ns.lookup(txn, ROOT_INO, b"f"), b.sm.ns.lookup(txn, ROOT_INO, b"d")))
    a.apply(c.Link(f, d, b"a", a.tick()))
    written = write(b, bf, 0, 2, 2)
    b.apply(c.Unlink(ROOT_INO, b"d", True, b.tick()))
    assert bd is not None
    for _ in range(3):  # a hears all, and forgets it all; b forgets nothing
        ship(b, a)
        ship(a, b, forget=True)
    assert a.read(lambda txn: a.sm.sites.object_of(txn, d)) is None, "a released /d"
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    ship(a, b)
    ship(b, a)
    assert kept_copies(a) == kept_copies(b)
    (kept,) = kept_copies(a).values()
    assert kept[3] == ((0, written[:4]), (1, written[4:])), "b's write is kept on both sites"
