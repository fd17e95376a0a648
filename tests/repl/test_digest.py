"""The tree digest (awsomefsd/repl/digest.py): equal for the same tree however it was made, and
for each kind of change a copy could lose, a difference naming the path and the field."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from awsomefsd.repl import digest as d
from awsomefsd.repl.digest import differences, digest_tree

TIME_NS = 1_600_000_000_123_456_789


def make_tree(root: Path, *, reverse: bool = False) -> None:
    """The same tree, made in one order or another (so with other inode numbers)."""
    def mkdirs() -> None:
        (root / "dir" / "deeper").mkdir(parents=True)

    def files() -> None:
        (root / "dir" / "a.txt").write_bytes(b"hello\n" * 1000)
        os.link(root / "dir" / "a.txt", root / "dir" / "deeper" / "hard")

    def specials() -> None:
        os.symlink("dir/a.txt", root / "link")  # may point at nothing yet
        os.mkfifo(root / "fifo")
        (root / "empty").write_bytes(b"")

    if reverse:
        for n in range(5):  # entries that come and go, so the inode numbers differ
            (root / f"junk{n}").write_bytes(b"j")
        specials()
        mkdirs()
        files()
        for n in range(5):
            (root / f"junk{n}").unlink()
    else:
        mkdirs()
        files()
        specials()
    with open(root / "sparse", "wb") as f:  # a hole here, written zeros on the other side
        if reverse:
            f.write(bytes(1 << 20))
        else:
            f.truncate(1 << 20)
    os.setxattr(root / "dir" / "a.txt", "user.origin", b"site-a")
    os.chmod(root / "dir" / "a.txt", 0o640)
    for path in (root / "dir" / "a.txt", root / "sparse", root / "empty", root / "fifo"):
        os.utime(path, ns=(TIME_NS, TIME_NS))
    os.utime(root / "link", ns=(TIME_NS, TIME_NS), follow_symlinks=False)


@pytest.fixture
def two_trees(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    make_tree(first)
    make_tree(second, reverse=True)
    return first, second


def test_the_same_tree_made_differently_has_one_digest(two_trees: tuple[Path, Path]) -> None:
    first, second = (digest_tree(p) for p in two_trees)
    assert differences(first, second) == []
    assert first.root_hash == second.root_hash
    assert ("hard link of", "dir/a.txt") in first.records["dir/deeper/hard"]


CHANGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "content": (lambda r: (r / "dir" / "a.txt").write_bytes(b"hellO\n" * 1000), "dir/a.txt: mtime"),
    "one byte, time kept": (lambda r: _poke(r / "sparse"), "sparse: content"),
    "mode": (lambda r: os.chmod(r / "dir" / "a.txt", 0o644), "dir/a.txt: mode 0o640 != 0o644"),
    "owner": (lambda r: os.chown(r / "empty", 1234, -1), "empty: uid 0 != 1234"),
    "mtime": (lambda r: os.utime(r / "empty", ns=(TIME_NS, TIME_NS + 1)), "empty: mtime"),
    "xattr": (lambda r: os.setxattr(r / "dir" / "a.txt", "user.origin", b"site-b"), "dir/a.txt: xattrs"),
    "symlink target": (lambda r: _relink(r / "link", "dir/deeper/hard"), "link: "),
    "renamed": (lambda r: os.rename(r / "empty", r / "empty2"), "empty: only in the first"),
    "added": (lambda r: (r / "dir" / "new").write_bytes(b"x"), "dir/new: only in the second"),
    "hard link became a copy": (lambda r: _unlink_to_copy(r / "dir" / "deeper" / "hard"),
                                "dir/deeper/hard: hard link of 'dir/a.txt' != None"),
    "size": (lambda r: os.truncate(r / "sparse", 1 << 19), "sparse: mtime"),
}


def _poke(path: Path) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(b"\1")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _relink(path: Path, target: str) -> None:
    st = os.lstat(path)
    path.unlink()
    os.symlink(target, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _unlink_to_copy(path: Path) -> None:
    data, st = path.read_bytes(), os.stat(path)
    path.unlink()
    path.write_bytes(data)
    os.chmod(path, st.st_mode & 0o7777)
    os.setxattr(path, "user.origin", os.getxattr(path.parent.parent / "a.txt", "user.origin"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_change_a_copy_could_lose_is_named_by_path_and_field(two_trees: tuple[Path, Path], change: str) -> None:
    first, second = two_trees
    mutate, expected = CHANGES[change]
    mutate(second)
    found = differences(digest_tree(first), digest_tree(second))
    assert any(line.startswith(expected) for line in found), found
    assert digest_tree(first).root_hash != digest_tree(second).root_hash


def test_directory_times_are_compared_only_when_asked(two_trees: tuple[Path, Path]) -> None:
    first, second = two_trees
    os.utime(second / "dir", ns=(TIME_NS, TIME_NS))
    assert differences(digest_tree(first), digest_tree(second)) == []
    assert any(line.startswith("dir: mtime") for line in
               differences(digest_tree(first, directory_mtimes=True), digest_tree(second, directory_mtimes=True)))


def test_a_coarser_time_resolution_ignores_nanoseconds(two_trees: tuple[Path, Path]) -> None:
    first, second = two_trees
    os.utime(second / "empty", ns=(TIME_NS, TIME_NS - 123_456_789))  # the same second
    assert differences(digest_tree(first), digest_tree(second))
    assert differences(digest_tree(first, mtime_resolution_ns=10**9),
                       digest_tree(second, mtime_resolution_ns=10**9)) == []


def test_a_deep_tree_is_walked_without_recursion(tmp_path: Path) -> None:
    depth = 1200  # deeper than Python's recursion limit
    path = tmp_path
    for _ in range(depth):
        path = path / "d"
        path.mkdir()
    (path / "leaf").write_bytes(b"x")
    try:
        assert "/".join(["d"] * depth) + "/leaf" in digest_tree(tmp_path).records
    finally:  # deepest first: Python's rmtree (pytest's clean-up) recurses and would fail on it
        (path / "leaf").unlink()
        for _ in range(depth):
            path.rmdir()
            path = path.parent


def test_the_walk_reports_progress_and_stays_on_its_file_system(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "f").write_bytes(b"x")
    seen: list[str] = []
    digest_tree(tmp_path, on_entry=seen.append)
    assert seen == ["", "f", "mnt"]
    mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "mnt")], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (tmp_path / "mnt" / "inside").write_bytes(b"y")
        assert "mnt/inside" not in digest_tree(tmp_path).records
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)


def test_planted_bug_attributes_left_out_hide_a_changed_xattr(two_trees: tuple[Path, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = two_trees
    os.setxattr(second / "dir" / "a.txt", "user.origin", b"site-b")
    monkeypatch.setattr(d, "_xattrs", lambda path: ())
    assert differences(digest_tree(first), digest_tree(second)) == []  # so the real check above has teeth



async def test_a_digest_cancelled_while_a_request_of_its_walk_hangs_ends_at_once_and_walks_no_further(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`local_digest` walks the daemon's own mount: a daemon stopping no longer answers the walk's
    FUSE requests, and its stop waited for the walk's thread (a minute and more with 50,000 files).
    One entry's read hangs here as such a request would; the cancelled digest returns at once, and
    once the read comes back the walk stops instead of reading on."""
    import threading

    import trio

    from awsomefsd.repl import verify

    for n in range(20):
        (tmp_path / f"f{n:02}").write_bytes(b"x")
    hung, release, ended = threading.Event(), threading.Event(), threading.Event()
    read: list[str] = []
    record, walk = d._record, verify.digest_tree

    def hanging_record(path: Path, rel: str, *args: object) -> d.Record:
        read.append(rel)
        if rel == "f05":
            hung.set()
            release.wait(10)
        return record(path, rel, *args)  # type: ignore[arg-type]

    def walk_noting_its_end(*args: object, **kwargs: object) -> d.TreeDigest:
        try:
            return walk(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            ended.set()
    monkeypatch.setattr(d, "_record", hanging_record)
    monkeypatch.setattr(verify, "digest_tree", walk_noting_its_end)
    with trio.fail_after(5):  # not the walk's 10 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(verify.local_digest, tmp_path, {})
            await trio.to_thread.run_sync(hung.wait)
            nursery.cancel_scope.cancel()
    release.set()
    assert await trio.to_thread.run_sync(ended.wait, 5)
    assert read[-1] == "f05", f"the walk read on after it was cancelled: {read}"
