"""The parts of a mount outliving its daemon, each on its own: handle numbers that describe their
handle, the descriptor keeper's protocol, systemd's store protocol (the sd_notify datagram with
SCM_RIGHTS, and $LISTEN_FDS: systemd itself does not run here, so a socket plays it), and the
session record. tests/mounted/test_restart.py runs them together against real mounts."""

from __future__ import annotations

import array
import dataclasses
import errno
import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from awsomefsd.daemon.node import Core
from awsomefsd.fs.handles import CRASH_UNREPORTED, Handles, decode_fh, encode_fh
from awsomefsd.fuse.kernel import takeover
from awsomefsd.fuse.kernel.keeper import KeeperStore, SystemdStore, descriptor_name, serve_keeper
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, Inode


def test_a_handle_number_names_its_inode_and_flags() -> None:
    for ino in (1, 17, 1 << 39):
        for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            fh = encode_fh(ino, flags, 12345)
            kept = flags & (os.O_ACCMODE | os.O_APPEND)
            assert decode_fh(fh) == (ino, kept)
    assert encode_fh(5, 0, 1) != encode_fh(5, 0, 2)


class _Meta:
    def __init__(self, known: set[int]) -> None:
        self.known = known

    def inode(self, ino: int) -> Inode | None:
        return Inode(ino, 0o100644, 0, 0, 1, 0, 0, 0, 0) if ino in self.known else None


def test_handles_are_handed_over_exactly_or_rebuilt_after_a_crash() -> None:
    before = Handles(_Meta({7, 8}))  # type: ignore[arg-type]
    writing = before.add(7, os.O_WRONLY | os.O_APPEND, 3)
    reading = before.add(8, os.O_RDONLY, 0)
    before.remember(7)
    before.remember(7)

    planned = Handles(_Meta({7, 8}))  # type: ignore[arg-type]
    planned.take_over(before.export())
    assert planned.require(writing).flags == os.O_WRONLY | os.O_APPEND and planned.require(writing).seen_loss == 3
    assert planned.lookups == {7: 2} and planned.may_purge
    with pytest.raises(Exception, match="Bad file descriptor"):
        planned.require(encode_fh(8, 0, 999))  # not handed over: no such handle
    assert planned.add(7, 0, 0) not in (writing, reading), "the serial goes on where it was"

    crashed = Handles(_Meta({7}))  # type: ignore[arg-type]
    crashed.take_over(None)
    rebuilt = crashed.require(writing)
    assert (rebuilt.ino, rebuilt.flags, rebuilt.seen_loss) == (7, os.O_WRONLY | os.O_APPEND, CRASH_UNREPORTED)
    assert rebuilt.rebuilt and not planned.require(writing).rebuilt
    with pytest.raises(FsError) as lost:
        crashed.require(reading)  # its inode was created and not durable: gone with the crash
    assert lost.value.errno == errno.EIO, "the writes are lost; EBADF would blame the application"
    assert not crashed.may_purge and crashed.holds(7)
    crashed.remember(7)
    crashed.remember(7)
    assert not crashed.forget(7, 1), "a reference given since the crash is still held"
    assert crashed.forget(7, 5), "an eviction gives back every reference, those from before the crash too"

    # a hand-over after the crash: the next daemon still knows the handle was rebuilt
    after = Handles(_Meta({7}))  # type: ignore[arg-type]
    after.take_over(crashed.export())
    assert after.require(writing).rebuilt
    # a record from a daemon that did not note it (four fields per handle)
    record = crashed.export()
    record["open"] = [entry[:4] for entry in record["open"]]
    older = Handles(_Meta({7}))  # type: ignore[arg-type]
    older.take_over(record)
    assert not older.require(writing).rebuilt


def test_the_keeper_keeps_hands_back_and_drops_descriptors(tmp_path: Path) -> None:
    path = tmp_path / "keeper.sock"
    ready = threading.Event()
    threading.Thread(target=serve_keeper, args=(path,), kwargs={"ready": ready.set}, daemon=True).start()
    assert ready.wait(10)
    store = KeeperStore(path)
    r, w = os.pipe()
    try:
        name = descriptor_name(tmp_path / "mnt")
        assert "/" not in name and ":" not in name
        assert store.take(name) is None
        store.put(name, w)
        got = store.take(name)
        assert got is not None and os.fstat(got).st_ino == os.fstat(w).st_ino
        os.close(w)
        os.write(got, b"through the kept copy")
        os.close(got)
        again = store.take(name)  # the keeper keeps its own copy when it hands one out
        assert again is not None
        os.close(again)
        store.drop(name)
        assert store.take(name) is None
        assert os.read(r, 100) == b"through the kept copy"
    finally:
        os.close(r)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:  # a request it does not know
        sock.connect(str(path))
        sock.send(b"STEAL everything")
        assert sock.recv(100).startswith(b"ERROR")
    with pytest.raises(OSError, match="keeper"):
        KeeperStore(tmp_path / "nobody.sock").take("x")


def test_the_keeper_says_it_holds_a_descriptor_and_serves_a_connection_until_it_closes(tmp_path: Path) -> None:
    path = tmp_path / "keeper.sock"
    ready = threading.Event()
    threading.Thread(target=serve_keeper, args=(path,), kwargs={"ready": ready.set}, daemon=True).start()
    assert ready.wait(10)
    r, w = os.pipe()
    try:
        KeeperStore(path).hold("fuse-abc", w, "0:77")
        got = KeeperStore(path).take("fuse-abc")
        assert got is not None and os.fstat(got).st_ino == os.fstat(w).st_ino
        os.close(got)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:  # one connection, several requests
            sock.connect(str(path))
            socket.send_fds(sock, [b"HOLD fuse-abc 0:77"], [w])
            assert sock.recv(100) == b"HELD fuse-abc 0:77"
            sock.send(b"DROP fuse-abc")
            assert sock.recv(100) == b"OK"
            sock.send(b"FETCH fuse-abc")
            assert sock.recv(100) == b"NONE"
        os.close(r)  # a descriptor whose other end is gone (poll: POLLERR), as a FUSE connection that ended
        r = -1
        with pytest.raises(OSError, match="has ended"):
            KeeperStore(path).hold("fuse-abc", w, "0:77")
        assert KeeperStore(path).take("fuse-abc") is None
    finally:
        os.close(w)
        if r >= 0:
            os.close(r)


def test_a_keeper_from_before_hold_is_given_the_descriptor_with_store(tmp_path: Path) -> None:
    """The keeper's DaemonSet updates only when its pods are deleted: a newer daemon meets an older keeper."""
    path = tmp_path / "old.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(4)
    heard: list[bytes] = []

    def old_keeper() -> None:  # one request per connection; knows STORE, FETCH and DROP only
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                message, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
                heard.append(message)
                for fd in fds:
                    os.close(fd)
                conn.send(b"OK" if message.startswith(b"STORE ") else b"ERROR unknown request")

    thread = threading.Thread(target=old_keeper, daemon=True)
    thread.start()
    r, w = os.pipe()
    try:
        KeeperStore(path).hold("fuse-abc", w, "0:77")
    finally:
        os.close(r)
        os.close(w)
        listener.close()
    thread.join(10)
    assert heard == [b"HOLD fuse-abc 0:77", b"STORE fuse-abc"]


def test_systemd_gets_the_descriptor_and_passes_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    r, w = os.pipe()
    try:
        SystemdStore().put("fuse-abc", w)
        fds = array.array("i")
        message, ancillary, _flags, _addr = notify.recvmsg(1024, socket.CMSG_SPACE(4 * fds.itemsize))
        assert message.split(b"\n") == [b"FDSTORE=1", b"FDNAME=fuse-abc"]
        fds.frombytes(ancillary[0][2][: fds.itemsize])
        assert os.fstat(fds[0]).st_ino == os.fstat(w).st_ino
        os.close(fds[0])

        # the next start: systemd passes it as fd 3 (here: whatever number, renumbered by the store)
        dup = os.dup(w)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        monkeypatch.setenv("LISTEN_FDNAMES", "fuse-abc")
        monkeypatch.setattr(SystemdStore, "LISTEN_FDS_START", dup)
        store = SystemdStore()
        assert store.take("other") is None
        assert store.take("fuse-abc") == dup and store.take("fuse-abc") is None
        os.close(dup)
        monkeypatch.setenv("LISTEN_PID", "1")  # meant for another process
        assert SystemdStore().take("fuse-abc") is None
    finally:
        os.close(r)
        os.close(w)
        notify.close()


def test_the_session_record_survives_and_a_damaged_one_is_ignored(tmp_path: Path) -> None:
    record = takeover.SessionRecord("/mnt/x", "0:51", 38, 0x1234, 1 << 20, {"open": [], "lookups": [], "serial": 3,
                                                                           "may_purge": True})
    takeover.save(tmp_path, record)
    assert takeover.load(tmp_path) == record
    carrying = dataclasses.replace(record, invalidations=[["entry", 1, "6c617465"]])
    takeover.save(tmp_path, carrying)
    assert takeover.load(tmp_path) == carrying
    older = json.loads((tmp_path / takeover.SESSION_FILE).read_text())
    del older["invalidations"]  # written by a build before unsent invalidations were handed over
    (tmp_path / takeover.SESSION_FILE).write_text(json.dumps(older))
    assert takeover.load(tmp_path) == record
    (tmp_path / takeover.SESSION_FILE).write_text("{not json")
    assert takeover.load(tmp_path) is None
    takeover.forget(tmp_path)
    assert takeover.load(tmp_path) is None


@pytest.mark.parametrize("forget_first", [True, False], ids=["forget-overtakes-release", "release-first"])
async def test_after_a_crash_an_unlinked_file_goes_when_its_last_handle_and_the_kernels_reference_do(
        core: Core, forget_first: bool) -> None:
    """After a crash only a FORGET can say the kernel holds an unlinked file no more; the kernel
    sends RELEASE in the background, so the FORGET of the evicted inode may come first. Either
    order deletes the file once both have come, and neither deletes it before."""
    fh, inode = await core.ops.create(ROOT_INO, b"held", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, b"h" * 10_000)
    await core.ops.fsync(fh, datasync=False)
    await core.ops.release(fh)
    kernels = encode_fh(inode.ino, os.O_RDONLY, 99)  # descriptors the dead daemon opened
    other = encode_fh(inode.ino, os.O_RDONLY, 98)
    crashed = Handles(core.meta)
    crashed.take_over(None)
    core.ops.handles = crashed
    assert await core.ops.read(kernels, 0, 3) == b"hhh"  # rebuilt
    assert await core.ops.read(other, 0, 3) == b"hhh"
    await core.ops.unlink(ROOT_INO, b"held", is_dir=False)
    assert core.meta.inode(inode.ino) is not None, "unknown handles may still hold it"
    if forget_first:
        await core.ops.forget([(inode.ino, 1)])
        assert core.meta.inode(inode.ino) is not None, "its descriptors are still open here"
        await core.ops.release(kernels)
        assert core.meta.inode(inode.ino) is not None, "one of its descriptors is still open here"
        await core.ops.release(other)
    else:
        await core.ops.release(kernels)
        await core.ops.release(other)
        assert core.meta.inode(inode.ino) is not None, "the kernel may hold descriptors not used since"
        await core.ops.forget([(inode.ino, 1)])
    assert core.meta.inode(inode.ino) is None and not list(core.meta.orphans())
