"""A bounded outbox as users meet it: two daemons in network namespaces (tests/support/sites.py),
the link cut while one site goes on writing. Past `[site] outbox_max_operations` capture pauses
(`site status` says so) and the outbox stops growing; healed, the outbox ships, capture resumes and
sends what changed meanwhile, and both sites hold the same tree with no conflict.
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

BOUND = 60


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Site, Site, Wan]]:
    with two_sites(tmp_path, extra_env={"AWSOMEFS_SITE__OUTBOX_MAX_OPERATIONS": str(BOUND)}) as made:
        yield made


def test_a_site_writing_while_the_other_is_away_stops_its_outbox_at_the_bound_and_converges_after(
        sites: tuple[Site, Site, Wan]) -> None:
    a, b, wan = sites
    (a.mount / "shared.txt").write_text("as both had it\n")
    link(a, b)
    wait_converged(a, b)
    wan.cut()
    (a.mount / "work").mkdir()
    for i in range(100):  # each create is several operations: past the bound
        (a.mount / "work" / f"f{i:03}").write_text(f"file {i}\n")
    wait_for(lambda: a.status().get("capture_paused") is True, 30, "a to pause capture past the bound")
    paused_at = a.status()["outbox_operations"]
    assert isinstance(paused_at, int) and paused_at > BOUND
    for i in range(100, 200):  # paused: the outbox grows no more, however much is written
        (a.mount / "work" / f"f{i:03}").write_text(f"file {i}\n")
    for i in range(50):  # one file written 50 times: one content at the resume
        (a.mount / "shared.txt").write_text(f"version {i}\n")
    (b.mount / "from-b.txt").write_text("made on b while cut\n")
    status = a.status()
    assert status["capture_paused"] is True and status["outbox_operations"] == paused_at, (paused_at, status)
    shown = a.cli("status").stdout
    assert "capture paused: outbox over the bound" in shown, shown
    os.chmod(a.mount / "work" / "f007", 0o600)  # while paused: sent at the resume

    wan.heal()
    wait_for(lambda: a.status().get("capture_paused") is False, 60, "a to resume capture once b applied its outbox")
    wait_converged(a, b)
    assert len(list((b.mount / "work").iterdir())) == 200
    assert (b.mount / "shared.txt").read_text() == "version 49\n"
    assert os.stat(b.mount / "work" / "f007").st_mode & 0o777 == 0o600
    assert (a.mount / "from-b.txt").read_text() == "made on b while cut\n"
    for site in (a, b):
        listed = json.loads(site.cli("conflicts", "--json").stdout)
        assert listed == [], (site.name, listed)
    assert "Traceback" not in a.logs() + b.logs()
