"""The `site` command's own rendering: the initial sync's progress line and the conflicts list,
fed with replies shaped like the daemon's (`SiteService.status`, `SiteTables.conflicts`); the
daemon tests (test_sites_daemons.py) run the real command against real daemons."""

from __future__ import annotations

import io
import time
from typing import Any

from awsomefsd.cli.repl import follow_initial_sync, render_conflicts
from awsomefsd.crdt.hlc import Stamp


def status(out_pending: int, received: int, in_pending: int, up: bool = True, exchanged_ns: int = 0) -> dict[str, Any]:
    return {"link_up": up, "last_error": "" if up else "UNAVAILABLE: connection refused",
            "last_exchange_ns": exchanged_ns,
            "outbound": {"pending_operations": out_pending, "bytes": 1 << 20},
            "inbound": {"operations": received, "pending_operations": in_pending, "bytes": 2 << 20}}


def test_the_initial_sync_progress_runs_until_neither_side_has_anything_left() -> None:
    replies = iter([status(90, 0, 50, up=False), status(40, 20, 30), status(0, 50, 0), status(0, 50, 0)])
    out = io.StringIO()
    follow_initial_sync(lambda: next(replies), (100, 50), out, interval_s=0)
    text = out.getvalue()
    assert "sent 10/100 operations" in text and "link down: UNAVAILABLE" in text
    assert "sent 60/100" in text and "received 20/50" in text
    assert text.endswith("the initial sync is done\n")
    assert next(replies) == status(0, 50, 0), "it stopped at the first reply with nothing left"


def test_a_restarted_daemon_that_counts_anew_ends_the_progress_once_the_peer_says_nothing_is_left() -> None:
    later = time.time_ns() + 10**9
    replies = iter([status(0, 0, 0), status(0, 3, 0, exchanged_ns=later), status(0, 3, 0)])
    out = io.StringIO()
    follow_initial_sync(lambda: next(replies), (0, 50), out, interval_s=0)
    assert out.getvalue().endswith("the initial sync is done\n") and next(replies) == status(0, 3, 0)


def test_on_a_cluster_member_that_does_not_run_the_link_the_progress_says_where_to_look() -> None:
    """It knows no figures (the leader does): it says so once instead of waiting for ever."""
    replies = iter([status(0, 0, 0, up=False) | {"elsewhere": "node 2 (n2, 10.0.0.2:7470) leads this site"}])
    out = io.StringIO()
    follow_initial_sync(lambda: next(replies), (100, 50), out, interval_s=0)
    assert "runs on the member that runs the link (node 2" in out.getvalue()


def test_conflicts_show_an_id_both_versions_and_what_was_kept() -> None:
    site_a, site_b = bytes.fromhex("aa" * 16), bytes.fromhex("bb" * 16)
    winner, loser = Stamp(1_795_000_000_000_000_000, 0, site_b), Stamp(1_794_999_999_000_000_000, 0, site_a)
    record = {"id": "0123456789ab", "kind": "content", "open": True, "path": "/docs/plan.txt",
              "object": "00" * 16, "winner": winner.pack().hex(), "loser": loser.pack().hex(),
              "winner_size": 19, "winner_hash": "f" * 32, "loser_size": 12, "loser_hash": "e" * 32,
              "kept_as": b".conflicts/x.conflict-aaaaaaaa-1".hex()}
    text = render_conflicts([record, record | {"open": False, "kept": "loser", "kept_as": None}])
    assert "0123456789ab  content    open     /docs/plan.txt" in text
    assert "won:  site bbbbbbbb" in text and "19 bytes, hash ffffffffffffffff" in text
    assert "lost: site aaaaaaaa" in text and "12 bytes, hash eeeeeeeeeeeeeeee" in text
    assert "kept as /.conflicts/x.conflict-aaaaaaaa-1" in text
    assert "resolved, kept the loser" in text
    assert render_conflicts([]) == "no conflicts"
