"""The initial sync streamed, as users meet it: two daemons in network namespaces
(tests/support/sites.py), site a holding a few thousand files. Linking returns at once; a's walk
seeds in slices, held back while b has not applied half the outbox's bound, so the sync is still
running when a is killed (-9), and later b; each restart takes the walk up where the log left it,
`site status` shows the progress, and both sites end with the same tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.cli.devcluster.network import available
from tests.support.daemon import wait_for
from tests.support.sites import Site, Wan, link, two_sites, wait_converged

pytestmark = pytest.mark.skipif(available() is not None, reason=f"network namespaces: {available()}")

BOUND = 1200
"""The outbox's bound: the walk waits while b has not applied half of it (repl/seeding.py)."""
DIRS, FILES = 20, 150


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Site, Site, Wan]]:
    with two_sites(tmp_path, extra_env={"AWSOMEFS_SITE__OUTBOX_MAX_OPERATIONS": str(BOUND)}) as made:
        yield made


def seeding(site: Site) -> dict[str, Any] | None:
    walk = site.status().get("seeding")
    assert walk is None or isinstance(walk, dict)
    return walk


def seeded(site: Site) -> int:
    walk = seeding(site)
    return -1 if walk is None else int(walk["entries_seeded"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_site_of_thousands_of_files_links_in_slices_and_resumes_after_either_side_is_killed(
        sites: tuple[Site, Site, Wan]) -> None:
    a, b, wan = sites
    for d in range(DIRS):
        (a.mount / f"d{d:02}").mkdir()
        for f in range(FILES):
            (a.mount / f"d{d:02}" / f"f{f:03}").write_text(f"{d}/{f}\n" if f % 10 == 0 else "")
    os.setxattr(a.mount / "d00" / "f000", "user.kept", b"yes")
    link(a, b)
    wan.cut()  # b applies nothing more: a's walk stops at half the bound, mid-sync
    wait_for(lambda: seeded(a) > 0, 30, "a's walk to be under way")
    shown = a.cli("status").stdout
    assert "initial sync:" in shown and "directories left to walk" in shown, shown
    before_kill = seeded(a)
    a.daemon.kill()  # -9 mid-sync
    a.daemon.stop_hard()
    a.daemon.start()
    walk = seeding(a)
    assert walk is not None and walk["entries_seeded"] >= before_kill, (before_kill, walk)  # from the log
    (a.mount / "d05" / "made-during-sync").write_text("new\n")  # captured once, wherever the walk is
    os.rename(a.mount / "d19" / "f099", a.mount / "d00" / "moved-across")  # not seeded yet, into walked
    b.daemon.kill()  # the receiving side, mid-sync
    b.daemon.stop_hard()
    b.daemon.start()
    wan.heal()
    wait_converged(a, b, deadline_s=180)
    assert seeding(a) is None and seeding(b) is None
    assert "initial sync" not in a.cli("status").stdout
    names = {str(p.relative_to(b.mount)) for p in b.mount.rglob("*") if not p.name.startswith(".")}
    assert len(names) == DIRS + DIRS * FILES + 1, len(names)
    assert (b.mount / "d00" / "moved-across").read_text() == ""
    assert (b.mount / "d05" / "made-during-sync").read_text() == "new\n"
    assert (b.mount / "d07" / "f010").read_text() == "7/10\n"
    assert os.getxattr(b.mount / "d00" / "f000", "user.kept") == b"yes"
    assert "Traceback" not in a.logs() + b.logs()
