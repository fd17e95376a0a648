"""A handful of the POSIX tests again, on a daemon whose metadata runs on the Raft engine
(`[meta] log = "raft"`, a one-member group): same state machine, different log underneath."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounted.conftest import running_daemon
from tests.mounted.test_posix import (  # noqa: F401 - collected here against the raft daemon
    test_error_numbers,
    test_fsync_fdatasync_syncfs,
    test_hard_links_and_symlinks,
    test_mkdir_readdir_rmdir,
    test_rename_overwrite_noreplace_exchange,
    test_tempfile_sqlite_tar_git,
    test_unlinked_open_file_stays_readable,
    test_write_read_truncate,
    test_xattrs,
)
from tests.support.daemon import Daemon, run_cli

pytestmark = pytest.mark.mounted
RAFT_ENV = {"AWSOMEFS_META__LOG": "raft"}


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon("awsomefs-raft-", env=RAFT_ENV) as d:
        yield d


def test_daemon_runs_the_raft_log(daemon: Daemon) -> None:
    assert any("metadata log: raft" in line for line in daemon.output), daemon.logs()


def test_status_shows_the_raft_state(daemon: Daemon, mnt: Path) -> None:
    (mnt / "f").write_text("x")
    r = run_cli("status", "--state", str(daemon.state), "--json")
    raft = json.loads(r.stdout)["metadata"]["raft"]
    assert raft["term"] >= 1 and raft["voters"] == [1], raft
    assert raft["commit_index"] >= raft["applied_index"] > 1, raft
    assert raft["match_index"] == {"1": raft["last_index"]}, raft
    table = run_cli("status", "--state", str(daemon.state)).stdout
    assert raft["leader"] == 1, raft  # the only voter leads while the daemon runs
    assert f"term {raft['term']}, leader 1, commit" in table, table
