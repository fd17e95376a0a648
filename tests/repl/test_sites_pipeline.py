"""A backlog over a 50 ms WAN with pushes in flight (`[site] pushes_in_flight`, issue 47), as a
user sees it: two single-node sites as real daemons, the link cut while a site writes a few
thousand operations, healed, cut again in the middle of the drain (pushes in flight lost, answers
lost), healed again. Everything arrives once: both trees and every file's bytes compare equal
(`site verify`), and the backlog drains within a deadline."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.members import wait_for
from awsomefsd.cli.devcluster.network import available
from tests.support.sites import Site, link, make_backlog, pending, two_sites, wait_converged

pytestmark = [pytest.mark.slow,  # about a minute on a loaded machine: test_pipelined.py is the default tier's
              pytest.mark.skipif(available() is not None, reason=f"network namespaces: {available()}")]

FILES = 1500
"""Empty files created on a while cut off: two operations each (a create and a name)."""
DRAIN_DEADLINE_S = 90.0
"""The backlog (about 3,600 operations) drains at 1,000 operations/s and more here; one push at a
time, 64 operations a round trip of 100 ms, it would take 6 s and more, so this only catches a
link that stalls."""


def received(site: Site) -> int:
    inbound = site.status()["inbound"]
    assert isinstance(inbound, dict)
    return int(inbound["operations"])


def test_a_backlog_drains_through_a_cut_in_the_middle_of_a_window(tmp_path: Path) -> None:
    """Small pushes (64 operations) and 8 in flight, so that the cut lands in a window: the pushes
    on the way are lost or applied with their answers lost, and the sender goes on from what the
    other site says it applied. Renames, contents written inline and a file staged apart (2 MiB)
    are in the backlog too."""
    env = {"AWSOMEFS_SITE__BATCH_OPERATIONS": "64", "AWSOMEFS_SITE__PUSHES_IN_FLIGHT": "8"}
    with two_sites(tmp_path, delay_ms=50, extra_env=env) as (a, b, wan):
        link(a, b)
        wait_converged(a, b)
        wan.cut()
        backlog = a.mount / "backlog"
        make_backlog(backlog, FILES, "content of")
        (backlog / "big").write_bytes(os.urandom(2 << 20))
        os.sync()
        total = pending(a)
        assert total > 3000, total  # 2 a create, 1 a rename, 1 a content
        before = received(b)
        start = time.monotonic()
        wan.heal()
        # cut again once part has arrived: with 8 pushes of 64 on the way, the cut lands in a window
        wait_for(lambda: received(b) - before >= 600, DRAIN_DEADLINE_S, "the first pushes to apply on b")
        wan.cut()
        left = pending(a)
        assert 0 < left < total, f"the cut landed after the drain ({left} of {total} pending)"
        wan.heal()
        wait_for(lambda: pending(a) == 0, DRAIN_DEADLINE_S, f"a backlog of {total} operations to drain")
        drained_s = time.monotonic() - start
        wait_converged(a, b)
        names = sorted(os.listdir(b.mount / "backlog"))
        assert names == sorted(os.listdir(backlog)) and len(names) == FILES + 1
        assert (b.mount / "backlog" / "big").read_bytes() == (backlog / "big").read_bytes()
        assert (b.mount / "backlog" / "f1").read_bytes() == (backlog / "f1").read_bytes()
        assert not [n for n in names if ".conflict-" in n], "a resend made a duplicate"
        print(f"{total} operations drained in {drained_s:.1f} s through two cuts")
