"""Mount tables as the kernel writes them: escaped spaces, tabs, newlines and backslashes, and
bytes that are not UTF-8, read back as the paths they name (by CSI's mount table and by the FUSE
binding's probes alike: one unescape)."""

from __future__ import annotations

import os
from pathlib import Path

from awsomefsd.csi.mounts import mount_table
from awsomefsd.fuse.mount import unescape_mount_field


def test_escapes_are_undone() -> None:
    assert unescape_mount_field(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert unescape_mount_field("/plain/path") == "/plain/path"
    assert unescape_mount_field(r"/trailing\04") == r"/trailing\04"  # not an escape: kept


def test_mount_table_reads_escaped_and_undecodable_mount_points(tmp_path: Path) -> None:
    odd = os.fsdecode(b"/var/lib/kubelet/pods/x/my vol\xff")
    lines = [
        r"36 35 0:52 / /mnt/with\040space rw,nosuid - fuse.awsomefs awsomefs rw,user_id=0",
        "37 35 0:53 /sub " + odd.replace(" ", r"\040") + r" rw - ext4 /dev/loop0 rw",
    ]
    (tmp_path / "mountinfo").write_bytes(os.fsencode("\n".join(lines) + "\n"))
    table = mount_table(str(tmp_path / "mountinfo"))
    assert [(m.mount_point, m.root, m.fs_type, m.device) for m in table] == [
        ("/mnt/with space", "/", "fuse.awsomefs", "0:52"),
        (odd, "/sub", "ext4", "0:53"),
    ]
