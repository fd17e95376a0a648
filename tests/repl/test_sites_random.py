"""Two sites under a random workload, as users would run it (slow): random namespace and data
operations through both mounts, in the root's tree and in a volume each site made through CSI
(design note 52), rounds with the link up and rounds cut off, kill -9 of a site and
its restart in between; then a last round cut off, and the heal.

Some files are patched in place past 2 MiB (sparse, with random bytes here and there): their
versions travel as deltas (design note 50). In the rounds cut off, each site also writes a bulk of
files (creates, renames, small contents) in a directory of its own: a backlog each way, which
must drain within a deadline set by a floor on the link's rate (issue 47): a link slower than
that, or one that stalls, fails the test. The default tier runs a small size (seconds); the slow
tier the three layouts, and a long run of more than 100,000 operations per site. Checked after each heal: both trees identical
(`site verify`), and every open conflict listed
alike on both sites. After a round cut off, also: every file content a site showed that it had
written in that round (each write is fsync'd: acknowledged) is still in some file of the merged
tree or kept in /.conflicts. The other site cannot have overwritten it knowingly, so nothing may
drop it: a concurrent write keeps the loser, a concurrent delete keeps the edit. Seeded: a
failure names its seed; `AWSOMEFS_SITES_SEED=n` replays it, `AWSOMEFS_SITES_ROUNDS` sets the rounds.
The shipping is not seeded, so a replay may take another path: every operation, its outcome and
each round's cut, heal and kill go to operations.txt beside the sites' state, for reading a
failure together with the two stores.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.members import wait_for
from awsomefsd.cli.devcluster.network import available
from tests.support import seeds
from tests.support.sites import (
    ClusterSite,
    Site,
    cluster_and_site,
    create_volume,
    link,
    make_backlog,
    pending,
    two_sites,
    wait_converged,
)

pytestmark = [pytest.mark.timeout(3600),  # 190 s for two 3-node sites on an idle 2-core machine; >300 s loaded
              pytest.mark.skipif(available() is not None, reason=f"network namespaces: {available()}")]

NAMES = ["a", "b", "c"]
SEED = int(os.environ.get("AWSOMEFS_SITES_SEED") or seeds.fresh_one("sites-random"))
ROUNDS = int(os.environ.get("AWSOMEFS_SITES_ROUNDS", "6"))
OPS_PER_ROUND = 40
BIG_BYTES = 2 << 20
"""A patched file grows to this: past what a push carries inline, so its versions go as deltas."""
BULK = "bulk-"
"""The bulk's directories (site and round in the name): left out of the random steps' choices."""
MIN_DRAIN_OPS_S = 250.0
"""The floor on the rate a backlog drains at, both ways at once, on a loaded two-core machine
(measured: more than 1,000 operations/s each way with pushes in flight)."""
TOLERATED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EINVAL,
             errno.EXDEV, errno.EPERM, errno.EBUSY}
"""What a random operation may be refused with, as a user's would be (a name taken, a file gone)."""


class Workload:
    def __init__(self, seed: int, journal: Path) -> None:
        self.rng = random.Random(seed)
        self.journal = journal
        """Every operation and its outcome, for reading a failure (the shipping is not seeded)."""
        self.tokens = 0
        self.written: list[bytes] = []
        """The tokens written in the current round."""

    def note(self, line: str) -> None:
        with self.journal.open("a") as journal:
            journal.write(line + "\n")

    def token(self, site: Site | ClusterSite) -> bytes:
        self.tokens += 1
        token = f"{site.name}-{self.tokens}\n".encode()
        self.written.append(token)
        return token

    def paths(self, root: Path) -> tuple[list[Path], list[Path]]:
        """The files and directories of the root's tree and of every volume's (a volume's root
        is a directory like another: removing or renaming it is refused, a rename across is
        EXDEV)."""
        files, dirs = [], [root]
        for top in [root, *sorted((root / ".volumes").iterdir())]:
            for path, subdirs, names in os.walk(top):
                if Path(path) == root:
                    subdirs[:] = [d for d in subdirs if not d.startswith((".", BULK))]
                elif Path(path) == top:
                    dirs.append(top)
                dirs += [Path(path) / d for d in subdirs]
                files += [Path(path) / n for n in names]
        return files, dirs

    def step(self, site: Site | ClusterSite) -> None:
        # on a cluster, through a member's mount chosen at random (the leader's or another's)
        root = self.rng.choice(site.running()).mount if isinstance(site, ClusterSite) else site.mount
        files, dirs = self.paths(root)
        rng = self.rng
        kind = rng.choice(["write", "write", "write", "append", "mkdir", "rename", "rename", "unlink", "rmdir",
                           "chmod", "xattr", "link", "truncate", "patch", "patch"])
        where = rng.choice(dirs) / rng.choice(NAMES)
        done: tuple[object, ...] = ()
        try:
            if kind == "write":
                target = rng.choice(files) if files and rng.random() < 0.5 else where
                if not target.is_dir():
                    done = (target, token := self.token(site))
                    with open(target, "wb") as f:
                        f.write(token)
                        os.fsync(f.fileno())
            elif kind == "append" and files:
                done = (target := rng.choice(files), token := self.token(site))
                with open(target, "ab") as f:
                    f.write(token)
                    os.fsync(f.fileno())
            elif kind == "mkdir":
                done = (where,)
                where.mkdir()
            elif kind == "rename" and (files or len(dirs) > 1):
                done = (source := rng.choice(files + dirs[1:]), where)
                os.rename(source, where)
            elif kind == "unlink" and files:
                done = (target := rng.choice(files),)
                os.unlink(target)
            elif kind == "rmdir" and len(dirs) > 1:
                done = (target := rng.choice(dirs[1:]),)
                os.rmdir(target)
            elif kind == "chmod" and files:
                done = (target := rng.choice(files), mode := rng.choice([0o600, 0o644, 0o640]))
                os.chmod(target, mode)
            elif kind == "xattr" and files:
                done = (target := rng.choice(files), name := f"user.{rng.choice(NAMES)}", token := self.token(site))
                os.setxattr(target, name, token)
            elif kind == "link" and files:
                done = (target := rng.choice(files), where)
                os.link(target, where)
            elif kind == "patch" and files:  # a large file written in place: it travels as deltas
                done = (target := rng.choice(files), offset := rng.randrange(BIG_BYTES), token := self.token(site))
                with open(target, "r+b") as f:
                    if os.fstat(f.fileno()).st_size < BIG_BYTES:
                        f.truncate(BIG_BYTES)
                    f.seek(offset)
                    f.write(rng.randbytes(rng.choice([1, 4096, 40_000])) + token)
                    os.fsync(f.fileno())
            elif kind == "truncate" and files:
                done = (target := rng.choice(files), size := rng.choice([0, 2]))
                os.truncate(target, size)
            outcome = "ok"
        except OSError as exc:
            if exc.errno not in TOLERATED:
                raise
            outcome = errno.errorcode[exc.errno or 0]
        if done:
            shown = " ".join(str(arg).replace(str(root), "") if isinstance(arg, Path) else repr(arg) for arg in done)
            self.note(f"{site.name} {kind} {shown} -> {outcome}")


    def bulk(self, site: Site | ClusterSite, round_: int, files: int) -> None:
        """`files` files created in a directory of the site's own, one in ten renamed, one in fifty
        given a few bytes: about 2.2 operations a file for the other site."""
        root = (site.leader().mount if isinstance(site, ClusterSite) else site.mount) / f"{BULK}{site.name}-{round_}"
        make_backlog(root, files, f"{site.name} {round_}")
        self.note(f"{site.name} bulk of {files} files in {root.name}")


def drained(a: Site | ClusterSite, b: Site | ClusterSite, backlog: int) -> None:
    """Until neither site has anything to send, within what `backlog` operations (both ways)
    take at MIN_DRAIN_OPS_S: a link that ships slower than that, or stalls, fails here."""
    deadline_s = 60 + backlog / MIN_DRAIN_OPS_S
    try:
        wait_for(lambda: pending(a) == 0 and pending(b) == 0, deadline_s,
                 f"a backlog of {backlog} operations to drain", interval_s=0.5)
    except TimeoutError:
        saved = [site.save_logs() for site in (a, b)]
        raise AssertionError(f"seed {SEED}: {pending(a)} and {pending(b)} operations of a {backlog}-operation "
                             f"backlog still to send after {deadline_s:.0f} s (logs: {saved})") from None


def contents(root: Path) -> dict[bytes, Path]:
    """Every regular file's bytes under `root`, /.conflicts included (with a path holding them),
    but the bulk's (no token is written there)."""
    found = {}
    for path, subdirs, names in os.walk(root):
        if Path(path) == root:
            subdirs[:] = [d for d in subdirs if not d.startswith(BULK)]
        for name in names:
            full = Path(path) / name
            try:
                if stat.S_ISREG(os.lstat(full).st_mode):
                    found[full.read_bytes()] = full
            except FileNotFoundError:
                pass  # a copy in /.conflicts the daemon dropped as we walked
    return found


def open_conflicts(site: Site | ClusterSite) -> set[tuple[str, str]]:
    listed = json.loads(site.cli("conflicts", "--json").stdout)
    return {(r["kind"], r["loser"]) for r in listed if r["open"]}


@pytest.mark.parametrize("layout, rounds, bulk", [
    pytest.param("single", 0, 1000, marks=pytest.mark.budget(90), id="single-small"),  # default tier: one round
    pytest.param("single", ROUNDS, 3000, marks=pytest.mark.slow, id="single"),
    pytest.param("cluster", ROUNDS, 3000, marks=pytest.mark.slow, id="cluster"),
    pytest.param("clusters", ROUNDS, 3000, marks=pytest.mark.slow, id="clusters"),
    pytest.param("single", 1, 50_000, marks=pytest.mark.slow, id="single-long"),
])
def test_two_sites_converge_under_a_random_workload_with_partitions_and_kills(
        tmp_path: Path, layout: str, rounds: int, bulk: int) -> None:
    """`single`: two single-node sites, b killed now and then. `cluster`: a is a three-node
    cluster, written through any member's mount, and its leader is killed now and then (the
    next one takes the link over; the old one comes back as a follower). `clusters`: both are.
    `bulk`: files each site writes in each round cut off (`single-long`: 50,000, more than
    100,000 operations a site, in its last round)."""
    workload = Workload(SEED, tmp_path / "operations.txt")
    made = two_sites(tmp_path, delay_ms=10, csi=True) if layout == "single" else \
        cluster_and_site(tmp_path, delay_ms=10, other_members=3 if layout == "clusters" else 1)
    with made as (a, b, wan):
        link(a, b)
        for site in (a, b):  # a volume of each site's: its files are replicated too (note 52)
            socket = site.csi_socket if isinstance(site, Site) else site.leader().csi_socket
            assert socket is not None
            create_volume(socket, f"pvc-{site.name}", 64 << 20)
        for round_ in range(rounds + 1):
            last = round_ == rounds
            cut = last or workload.rng.random() < 0.5
            workload.note(f"round {round_}" + (" cut off" if cut else ""))
            if cut:
                wan.cut()
            for _ in range(OPS_PER_ROUND):
                workload.step(a if workload.rng.random() < 0.5 else b)
            if cut and bulk:
                for site in (a, b):
                    workload.bulk(site, round_, bulk)
            if not last and workload.rng.random() < 0.3:
                clusters = [site for site in (a, b) if isinstance(site, ClusterSite)]
                victim = workload.rng.choice(clusters) if clusters else b
                if isinstance(victim, ClusterSite):
                    old = victim.leader()
                    workload.note(f"kill -9 {victim.name}'s leader (node {old.index}), restart it")
                    old.kill()
                    old.start("run")
                else:
                    workload.note("kill -9 b, restart")
                    b.daemon.kill()
                    b.daemon.stop_hard()
                    b.daemon.start()
            fresh = {content: path for content, path in (contents(a.mount) | contents(b.mount)).items()
                     if any(token in content for token in workload.written)}
            before = {site.name: sorted((str(path), content) for content, path in contents(site.mount).items())
                      for site in (a, b)}
            workload.written = []
            backlog = pending(a) + pending(b)
            if cut:
                wan.heal()
            drained(a, b, backlog)
            wait_converged(a, b, 120)
            # /.conflicts is each site's own (verify leaves it out): what either keeps counts
            merged = contents(a.mount) | contents(b.mount)
            if open_conflicts(a) != open_conflicts(b):
                saved = [site.save_logs() for site in (a, b)]
                listed = {site.name: {(r["kind"], r["loser"]): r for r in json.loads(site.cli("conflicts", "--json").stdout)}
                          for site in (a, b)}
                only = {name: [r for key, r in records.items() if r["open"] and key not in open_conflicts(other)]
                        for (name, records), other in zip(listed.items(), (b, a))}
                raise AssertionError(f"seed {SEED} round {round_}: the open conflicts differ: {json.dumps(only, indent=1)} "
                                     f"(logs: {saved})")
            if cut:
                lost = {content: str(path) for content, path in fresh.items() if content not in merged}
                if lost:
                    for site in (a, b):
                        saved = Path(site.save_logs().split(", ")[0]).parent
                        (saved / "tree.txt").write_text("\n".join(
                            f"{path} {content!r}" for content, path in sorted(contents(site.mount).items())))
                        (saved / "before.txt").write_text(repr(before))
                assert not lost, (f"seed {SEED} round {round_}: writes lost without a trace: {lost}; conflicts: "
                                  f"{a.cli('conflicts', '--json').stdout} {b.cli('conflicts', '--json').stdout}")
