"""Unlink, then link the same site again, as users run it: two daemons in network namespaces
(tests/support/sites.py), paired with the real CLI. What both sites held before the unlink pairs
up again (nothing shows twice); what changed on either side while unlinked arrives like any
concurrent change, and a file changed on both sides is a conflict, listed, its loser kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.network import available
from tests.support.daemon import wait_for
from tests.support.sites import Site, Wan, link, two_sites, wait_converged

pytestmark = pytest.mark.skipif(available() is not None, reason=f"network namespaces: {available()}")


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Site, Site, Wan]]:
    with two_sites(tmp_path) as made:
        yield made


def names(site: Site) -> list[str]:
    return sorted(str(p.relative_to(site.mount)) for p in site.mount.rglob("*")
                  if not p.relative_to(site.mount).parts[0].startswith("."))


def test_unlink_then_link_again_pairs_up_what_both_held_and_merges_what_changed(
        sites: tuple[Site, Site, Wan]) -> None:
    a, b, _wan = sites
    (a.mount / "docs").mkdir()
    for name in ("notes.txt", "docs/plan.txt", "keep.txt", "gone.txt", "both.txt"):
        (a.mount / name).write_text(f"{name} as it was\n")
    os.setxattr(a.mount / "docs" / "plan.txt", "user.owner", b"team-a")
    (b.mount / "from-b.txt").write_text("made on b\n")
    link(a, b)
    wait_converged(a, b)
    told = a.cli("unlink")
    assert told.returncode == 0 and "kept" in told.stdout and "was told" in told.stdout, told.stdout + told.stderr
    wait_for(lambda: b.status()["linked"] is False, 60, "b to unlink when a tells it")
    assert a.status()["kept_for"] == b.status()["site"] and b.status()["kept_for"] == a.status()["site"]
    assert "linking it again pairs up" in a.cli("status").stdout

    (a.mount / "docs" / "plan.txt").write_text("edited on a while unlinked\n")
    os.rename(a.mount / "keep.txt", a.mount / "docs" / "kept.txt")
    os.unlink(a.mount / "gone.txt")
    (a.mount / "new-a.txt").write_text("made on a while unlinked\n")
    (a.mount / "both.txt").write_text("both.txt edited on a\n")
    (b.mount / "notes.txt").write_text("edited on b while unlinked\n")
    os.chmod(b.mount / "from-b.txt", 0o600)
    os.setxattr(b.mount / "docs" / "plan.txt", "user.reviewed", b"yes")
    (b.mount / "new-b.txt").write_text("made on b while unlinked\n")
    (b.mount / "both.txt").write_text("both.txt edited on b, later\n")

    token = b.cli("link")
    assert token.returncode == 0, token.stderr
    again = a.cli("link", token.stdout.strip())
    assert again.returncode == 0 and "linked again" in again.stdout, again.stdout + again.stderr
    wait_converged(a, b)  # `site verify` agrees
    expected = ["both.txt", "docs", "docs/kept.txt", "docs/plan.txt", "from-b.txt", "new-a.txt", "new-b.txt",
                "notes.txt"]
    for site in (a, b):
        assert names(site) == expected, (site.name, names(site))  # no `.conflict-` duplicates
        assert (site.mount / "docs" / "plan.txt").read_text() == "edited on a while unlinked\n", site.name
        assert (site.mount / "notes.txt").read_text() == "edited on b while unlinked\n", site.name
        assert (site.mount / "docs" / "kept.txt").read_text() == "keep.txt as it was\n", site.name
        assert os.stat(site.mount / "from-b.txt").st_mode & 0o777 == 0o600, site.name
        assert os.getxattr(site.mount / "docs" / "plan.txt", "user.owner") == b"team-a"
        assert os.getxattr(site.mount / "docs" / "plan.txt", "user.reviewed") == b"yes"
        listed = [(r["kind"], r["path"]) for r in json.loads(site.cli("conflicts", "--json").stdout) if r["open"]]
        assert listed == [("content", "/both.txt")], (site.name, listed)  # the one real conflict
        kept = sorted(p.read_text() for p in (site.mount / ".conflicts").iterdir())
        assert kept == ["both.txt edited on a\n"], (site.name, kept)

    forgot = b.cli("unlink", "--forget")
    assert forgot.returncode == 0 and "nothing is kept" in forgot.stdout, forgot.stdout + forgot.stderr
    assert b.status()["linked"] is False and b.status()["kept_for"] is None
    wait_for(lambda: a.status()["linked"] is False, 60, "a to unlink when b tells it")
    nothing = b.cli("unlink", "--forget")
    assert nothing.returncode != 0 and "keeps nothing" in nothing.stderr, nothing.stdout + nothing.stderr
    assert "Traceback" not in nothing.stderr and "Traceback" not in a.logs() + b.logs()


def test_what_the_kernel_writes_back_reaches_the_other_site(tmp_path: Path) -> None:
    """Under the writeback cache the kernel sends a file's pages when it likes and sets the times
    itself; a flush of pages no write stamped keeps the times. It was taken for a compaction,
    which changes no byte, and not captured: a file larger than the daemon's per-file buffer
    (flushed while it was written) reached the other site with its new size and times but old
    bytes, and `site verify` never agreed. Each site here: the writeback cache, 1 MiB per file."""
    env = {"AWSOMEFS_MOUNT__TRANSPORT": "kernel", "AWSOMEFS_MOUNT__WRITEBACK_CACHE": "true",
           "AWSOMEFS_DATA__FILE_BUFFER_BYTES": str(1 << 20)}
    with two_sites(tmp_path, extra_env=env) as (a, b, _wan):
        link(a, b)
        wait_converged(a, b)
        data = os.urandom(6 << 20)
        # at the close the kernel sends the pages, more than the daemon buffers for a file: it
        # flushes them as they come, no write stamped; the times come last, with what is left
        (a.mount / "written-back.bin").write_bytes(data)
        wait_converged(a, b)
        assert (b.mount / "written-back.bin").read_bytes() == data
