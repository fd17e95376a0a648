"""What resolving a conflict writes through the mount (repl/resolve.py), on a plain directory
standing in for the mount: the calls are POSIX ones, and the daemon tests run them on a real
mount (tests/repl/test_sites_daemons.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.crdt.hlc import Stamp
from awsomefsd.repl.resolve import ResolveError, write_back

SITE = bytes.fromhex("ab" * 16)
LOSER = Stamp(1_795_000_000_000_000_000, 0, SITE)


def fs_with_kept_copy(root: Path) -> dict[str, Any]:
    (root / ".conflicts").mkdir()
    (root / "docs").mkdir()
    (root / "docs" / "plan.txt").write_text("the winner\n")
    kept = root / ".conflicts" / "0011.conflict-abababab-1795000000000000000"
    kept.write_text("the loser\n")
    os.utime(kept, ns=(5, 1_700_000_000_000_000_000))
    return {"kind": "content", "path": "/docs/plan.txt", "loser": LOSER.pack().hex(),
            "kept_as": b".conflicts/0011.conflict-abababab-1795000000000000000".hex()}


def test_keeping_the_loser_writes_it_into_the_same_file(tmp_path: Path) -> None:
    record = fs_with_kept_copy(tmp_path)
    before = os.stat(tmp_path / "docs" / "plan.txt").st_ino
    write_back(tmp_path, record, "loser")
    after = os.stat(tmp_path / "docs" / "plan.txt")
    assert (tmp_path / "docs" / "plan.txt").read_text() == "the loser\n"
    assert after.st_ino == before, "the same file (its other names, its attributes), new content"
    assert after.st_mtime_ns == 1_700_000_000_000_000_000, "the losing version's mtime"


def test_keeping_both_puts_the_loser_beside_the_file_under_its_conflict_name(tmp_path: Path) -> None:
    record = fs_with_kept_copy(tmp_path)
    done = write_back(tmp_path, record, "both")
    beside = tmp_path / "docs" / f"plan.txt.conflict-abababab-{LOSER.wall_ns}"
    assert beside.read_text() == "the loser\n" and str(beside.relative_to(tmp_path)) in done
    assert (tmp_path / "docs" / "plan.txt").read_text() == "the winner\n"
    with pytest.raises(ResolveError, match="exists already"):
        write_back(tmp_path, record, "both")


def test_keeping_the_winner_writes_nothing(tmp_path: Path) -> None:
    record = fs_with_kept_copy(tmp_path)
    write_back(tmp_path, record, "winner")
    assert (tmp_path / "docs" / "plan.txt").read_text() == "the winner\n"


def test_an_edit_against_a_delete_comes_back_where_it_was_or_at_the_root(tmp_path: Path) -> None:
    record = fs_with_kept_copy(tmp_path) | {"kind": "edit-delete", "path": None, "restore_to": "/docs/old.txt"}
    write_back(tmp_path, record, "loser")
    assert (tmp_path / "docs" / "old.txt").read_text() == "the loser\n"
    write_back(tmp_path, record, "loser")  # the name is taken now: beside it, under the conflict name
    assert (tmp_path / "docs" / f"old.txt.conflict-abababab-{LOSER.wall_ns}").read_text() == "the loser\n"
    gone = record | {"restore_to": "/removed-dir/old.txt"}
    write_back(tmp_path, gone, "loser")
    assert (tmp_path / "old.txt").read_text() == "the loser\n", "its directory went too: at the root"


def test_a_losing_attribute_value_is_set_again(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    record = {"kind": "attributes", "path": "/f", "loser": LOSER.pack().hex(),
              "loser_value": [0o640, os.getuid(), os.getgid(), 11, 22]}
    write_back(tmp_path, record, "loser")
    st = os.stat(tmp_path / "f")
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_atime_ns, st.st_mtime_ns) == (11, 22)


def test_what_cannot_be_done_is_said_and_nothing_is_written(tmp_path: Path) -> None:
    record = fs_with_kept_copy(tmp_path)
    (tmp_path / bytes.fromhex(record["kept_as"]).decode()).unlink()
    with pytest.raises(ResolveError, match="is gone"):
        write_back(tmp_path, record, "loser")
    with pytest.raises(ResolveError, match="no longer kept"):
        write_back(tmp_path, record | {"kept_as": None}, "loser")
    (tmp_path / "again").mkdir()
    with pytest.raises(ResolveError, match="no name"):
        write_back(tmp_path / "again", fs_with_kept_copy(tmp_path / "again") | {"path": None}, "loser")
    assert (tmp_path / "docs" / "plan.txt").read_text() == "the winner\n"
