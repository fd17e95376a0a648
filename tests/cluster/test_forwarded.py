"""Creates and looks in a directory another member holds are sent to that member (design note
145, fs/forwarding.py), on a real three-node cluster: the holder makes the file for the requester,
which gets it with its write lease and reads it at once; others see it; exclusive creates racing
from three nodes through the holder have one winner per name; and nothing anyone acknowledged is
lost."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from tests.cluster.test_delegations import create, forwarded, metric
from tests.support.cluster import Cluster, Node
from tests.support.daemon import wait_for


def test_a_create_in_a_directory_another_node_holds_is_made_there_for_the_creator(cluster3: Cluster) -> None:
    """The holder keeps its delegation and makes the file; the requester answers the kernel with
    it at once (stat, write, close with no wait for a write lease: the lease came with the create),
    and a third node reads what was written. A look for a missing name is answered by the holder
    too. Fails when the requester does not wait to apply the holder's create (the file is not
    there to open), or when the lease goes to the holder (the requester's write waits for it)."""
    holder, requester, third = cluster3.form(3)
    (holder.mount / "d").mkdir()
    for i in range(20):  # the holder is busy in d: it keeps the delegation
        create(holder.mount / "d" / f"h{i}", b"h")
    wait_for(lambda: (requester.mount / "d").is_dir(), 10, "d on the requester")
    looks, made, served = forwarded(requester, "look"), forwarded(requester, "create"), forwarded(holder, "served")
    waits = metric(requester, "awsomefs_write_lease_waits_total")
    handed = metric(holder, "awsomefs_write_leases_released_total")
    on_wire = metric(requester, "awsomefs_holder_calls_on_wire_total")

    assert not (requester.mount / "d" / "absent").exists()
    fd = os.open(requester.mount / "d" / "r0", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    try:
        assert os.fstat(fd).st_mode & 0o777 == 0o640
        os.write(fd, b"written by the requester")
    finally:
        os.close(fd)
    assert forwarded(requester, "create") == made + 1, "the create went to the holder"
    assert forwarded(requester, "look") >= looks + 2, "the missing names were looked up at the holder"
    assert forwarded(holder, "served") == served + 1
    assert metric(requester, "awsomefs_holder_calls_on_wire_total") >= on_wire + 3, "not on the Raft wire (note 147)"
    assert metric(requester, "awsomefs_write_lease_waits_total") == waits, "the file's lease came with it"
    assert metric(holder, "awsomefs_write_leases_released_total") == handed, "the holder kept its delegation"
    assert (requester.mount / "d" / "r0").read_bytes() == b"written by the requester"
    assert (third.mount / "d" / "r0").read_bytes() == b"written by the requester"
    assert (holder.mount / "d" / "r0").read_bytes() == b"written by the requester"

    create(holder.mount / "d" / "h-after", b"h")  # the holder goes on under its delegation
    expected = sorted([*(f"h{i}" for i in range(20)), "h-after", "r0"])
    for node in (holder, requester, third):
        assert sorted(os.listdir(node.mount / "d")) == expected, node.index
        assert metric(node, "awsomefs_meta_ahead_lost_total") == 0
    with pytest.raises(FileExistsError):
        os.open(requester.mount / "d" / "h3", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)


def test_exclusive_creates_from_three_nodes_in_one_directory_have_one_winner_each(cluster3: Cluster) -> None:
    """Three nodes create the same 60 names with O_EXCL at once in one directory, each with a name
    of its own between them, so that turns and creates sent to the holder mix: each name has one winner, whose bytes every node reads, and
    every other try got EEXIST. Fails when a create sent to the holder is also made the usual way
    (the fall-back with the same inode number must find it as its own, not make a second)."""
    nodes = cluster3.form(3)
    (nodes[0].mount / "race").mkdir()
    for node in nodes:
        wait_for(lambda node=node: (node.mount / "race").is_dir(), 10, f"race on node {node.index}")
    names = [f"n{i:02d}" for i in range(60)]
    won: dict[str, list[int]] = {name: [] for name in names}
    errors: list[BaseException] = []
    start = threading.Barrier(3, timeout=60)

    def creator(node: Node) -> None:
        try:
            start.wait()
            for i, name in enumerate(names):
                create(node.mount / "race" / f"own{node.index}.{i}")  # a name only this node makes
                try:
                    create(node.mount / "race" / name, str(node.index).encode())
                except FileExistsError:
                    continue
                won[name].append(node.index)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=creator, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert {name: winners for name, winners in won.items() if len(winners) != 1} == {}
    own = [f"own{node.index}.{i}" for node in nodes for i in range(len(names))]
    for node in nodes:
        assert sorted(os.listdir(node.mount / "race")) == sorted([*names, *own])
        for name in names:
            assert (node.mount / "race" / name).read_bytes() == str(won[name][0]).encode(), (node.index, name)
        assert metric(node, "awsomefs_meta_ahead_lost_total") == 0
    assert sum(forwarded(node, "create") for node in nodes) > 0, "no create went to a holder"


def test_a_create_sent_to_the_holder_keeps_the_errors_of_a_create(cluster3: Cluster) -> None:
    """A name too long is refused before anything is sent, and an existing name is EEXIST for
    O_EXCL and opens the file without it, as the usual create would."""
    holder, requester, _ = cluster3.form(3)
    (holder.mount / "e").mkdir()
    create(holder.mount / "e" / "there", b"x")
    wait_for(lambda: (requester.mount / "e" / "there").exists(), 10, "the file on the requester")
    with pytest.raises(OSError) as info:
        os.open(requester.mount / "e" / ("n" * 256), os.O_CREAT | os.O_WRONLY, 0o644)
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(FileExistsError):
        os.open(requester.mount / "e" / "there", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    fd = os.open(requester.mount / "e" / "there", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    assert (requester.mount / "e" / "there").read_bytes() == b"x"


def test_a_look_that_finds_a_name_in_a_directory_another_node_holds_is_answered_there(cluster3: Cluster) -> None:
    """Another node stats and reads files in a directory the holder keeps changing, including one
    the holder created a moment ago (fresh: its name and data may still be in the holder's
    pipeline): the holder answers each look (design note 148), no delegation moves, and the reader
    sees every byte the holder wrote. Fails when a look that finds the name takes the delegation
    as before (the holder hands it over), or when the holder answers a fresh file's look without
    deciding what it acknowledged first (the reader does not find the file, or reads it empty)."""
    holder, reader, _ = cluster3.form(3)
    (holder.mount / "d").mkdir()
    for i in range(10):  # the holder is busy in d: it keeps the delegation
        create(holder.mount / "d" / f"f{i}", f"old{i}".encode())
    wait_for(lambda: (reader.mount / "d" / "f9").exists(), 10, "the files on the reader")
    looks, handed = forwarded(reader, "look"), metric(holder, "awsomefs_write_leases_released_total")
    for i in range(10):
        assert (reader.mount / "d" / f"f{i}").read_bytes() == f"old{i}".encode()
        create(holder.mount / "d" / f"new{i}", f"new{i}".encode())  # fresh on the holder
        assert (reader.mount / "d" / f"new{i}").read_bytes() == f"new{i}".encode(), i
    assert forwarded(reader, "look") >= looks + 10, "the looks were answered by the holder"
    assert metric(holder, "awsomefs_write_leases_released_total") == handed, "the holder kept its delegation"
    assert metric(holder, "awsomefs_meta_ahead_lost_total") == 0
