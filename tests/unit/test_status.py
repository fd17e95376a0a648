"""`status` lists this node's mounts only: its mount point and the bind mounts of it (CSI
volumes), never another node's AwsomeFS mount on the same machine (a test cluster in network
namespaces, or a second dev instance). The mount table is given, not read from this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from awsomefsd.cli.status import collect_status
from awsomefsd.config import MountSettings, NodeSettings, Settings
from awsomefsd.csi import mounts
from awsomefsd.csi.mounts import MountEntry
from awsomefsd.fuse.mount import FSTYPE

TABLE = [
    MountEntry("/", "/", frozenset({"rw"}), "ext4", "/dev/vda", "254:0"),
    MountEntry("/mnt/a", "/", frozenset({"rw"}), FSTYPE, "awsomefs", "0:61"),
    MountEntry("/var/lib/kubelet/pods/p/volumes/v", "/volumes/v", frozenset({"rw"}), FSTYPE, "awsomefs", "0:61"),
    MountEntry("/mnt/b", "/", frozenset({"rw"}), FSTYPE, "awsomefs", "0:62"),
]


@pytest.fixture(autouse=True)
def table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts, "mount_table", lambda: TABLE)


def test_a_node_lists_its_mount_and_the_binds_of_it(tmp_path: Path) -> None:
    settings = Settings(node=NodeSettings(state_dir=tmp_path), mount=MountSettings(path=Path("/mnt/a")))
    assert collect_status(settings, running=False)["mounts"] == ["/mnt/a", "/var/lib/kubelet/pods/p/volumes/v"]


def test_without_a_known_mount_point_no_mount_is_called_ours(tmp_path: Path) -> None:
    """No daemon running and no mount point configured: listing every AwsomeFS mount here would
    show other nodes' mounts as this one's."""
    settings = Settings(node=NodeSettings(state_dir=tmp_path))
    assert collect_status(settings, running=False)["mounts"] == []


def test_the_ahead_row_counts_creates_made_by_other_holders_and_for_others() -> None:
    """design note 145: a member's creates in directories other members held are made there, and
    this one makes theirs: `status` says how many, and says nothing of them while there are none."""
    from awsomefsd.cli.status import _cluster_rows

    raft = {"term": 2, "leader": 1, "commit_index": 9, "applied_index": 9, "last_index": 9}
    ahead = {"pending": 0, "acknowledged": 40, "lost": 0, "delegations": 1, "sent": 0, "served": 0}
    rows = dict(_cluster_rows({"raft": raft, "nodes": [], "ahead": ahead}))
    assert "holders" not in rows["ahead"]
    rows = dict(_cluster_rows({"raft": raft, "nodes": [], "ahead": {**ahead, "sent": 12, "served": 3}}))
    assert rows["ahead"].endswith("; creates made by other holders 12, made here for others 3")
