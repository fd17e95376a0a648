"""A cluster member hands its mount over to its next daemon (SIGUSR2: `systemctl reload`, a package
upgrade, the DaemonSet's preStop hook) while the cluster goes on: the member gives back what it
holds (write leases, delegations) as at any stop, the other members keep serving meanwhile, and
the next daemon continues the same mount. Applications on the member see a pause, no error:
a writer's and a reader's descriptors and a shell's working directory keep working, and every
byte the writer was told is written is there, on every member.

The descriptor is kept by `awsomefsd fd-keeper` (what systemd's file descriptor store does for
the unit). The daemons run in network namespaces; the applications run in the root namespace,
where every member's mount is."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.network import PrivateNetwork
from tests.support.apps import LINES, Reader, expected, shell_run, start_shell, start_writer
from tests.support.cluster import cluster_in
from tests.support.daemon import AWSOMEFSD, REPO, is_mounted, wait_for

EXIT_HANDED_OVER = 75


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[Path]:
    """A running `awsomefsd fd-keeper`; yields its socket."""
    socket_path = tmp_path / "keeper.sock"
    with open(tmp_path / "keeper.log", "w") as keeper_log:
        proc = subprocess.Popen([*AWSOMEFSD, "fd-keeper", "--socket", str(socket_path)], stdout=subprocess.PIPE,
                                stderr=keeper_log, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("awsomefsd: keeping descriptors on"), "the keeper did not start"
        yield socket_path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_a_member_hands_its_mount_over_while_the_cluster_goes_on(
        netns_network: Callable[[int], PrivateNetwork], tmp_path: Path, keeper: Path) -> None:
    with cluster_in(netns_network(3), tmp_path) as cluster:
        for node in cluster.nodes:
            node.env = {**cluster.env, "AWSOMEFS_MOUNT__FD_KEEPER": str(keeper)}
        first, member, third = cluster.form(3)
        work = member.mount / "work"
        work.mkdir()
        (work / "read-me").write_bytes(b"r" * 100_000)
        reader = Reader(work / "read-me")
        shell = start_shell(work)
        assert shell_run(shell, "echo hello > from-shell && cat from-shell") == ["hello"]
        writer = start_writer(work / "log", sync_at=LINES)  # no sync before the end: a hand-over loses nothing
        wait_for(lambda: writer.wrote() >= LINES // 4, 60, "the writer to be under way")
        # "no such file" in a directory this member holds: its kernel keeps that answer long
        assert shell_run(shell, "test -e while-away || echo absent") == ["absent"]

        member.signal(signal.SIGUSR2)
        assert member.wait_exit() == EXIT_HANDED_OVER, member.logs()
        assert is_mounted(member.mount), "a hand-over leaves the mount in place"
        (first.mount / "work" / "while-away").write_text("the others go on\n")
        member.start("run")
        assert "continuing the mount" in member.logs(), member.logs()
        # the daemon that handed over gave the directory back: the kernel forgot the long answer
        assert shell_run(shell, "cat while-away") == ["the others go on"]

        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 120, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        done = next(line for line in writer.lines if line.startswith("done"))
        assert done.endswith("[]"), f"no fsync error after a hand-over: {done}"
        for node in (first, member, third):
            assert (node.mount / "work" / "log").read_bytes() == expected(LINES), f"node {node.index}"
        assert reader.read_size() == 100_000, "a descriptor opened before reads on"
        reader.close()
        assert shell_run(shell, "cat while-away && ls") == ["the others go on", "from-shell", "log", "read-me",
                                                             "while-away"]
        assert shell_run(shell, "echo again > after && cat after") == ["again"]
        shell.stdin.close()  # type: ignore[union-attr]
        assert shell.wait(30) == 0
        assert (third.mount / "work" / "after").read_text() == "again\n"
        print(f"longest write during the hand-over: {float(done.split()[1]) * 1000:.0f} ms")


def test_a_member_killed_and_restarted_continues_its_mount(
        netns_network: Callable[[int], PrivateNetwork], tmp_path: Path, keeper: Path) -> None:
    """SIGKILL (a crash; systemd restarts the unit): the keeper's copy of the descriptor keeps the
    mount, the next daemon continues it after the crash and the cluster has expired the dead
    process's lease. Synced bytes survive, descriptors opened before keep working, and the one
    EIO at the writer's next fsync reports what the crash may have lost."""
    with cluster_in(netns_network(3), tmp_path) as cluster:
        for node in cluster.nodes:
            node.env = {**cluster.env, "AWSOMEFS_MOUNT__FD_KEEPER": str(keeper)}
        first, member, _ = cluster.form(3)
        work = member.mount / "work"
        work.mkdir()
        (work / "read-me").write_bytes(b"r" * 10_000)
        os.sync()
        reader = Reader(work / "read-me")
        shell = start_shell(work)
        synced_at = LINES // 4
        writer = start_writer(work / "log", sync_at=synced_at)
        wait_for(lambda: writer.has("synced"), 60, "the writer's fsync")

        member.signal(signal.SIGKILL)
        member.wait_exit()
        assert is_mounted(member.mount), "the keeper holds the mount's descriptor"
        member.start("run")
        assert "continuing the mount" in member.logs() and "crash" in member.logs(), member.logs()

        wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 120, "the writer to finish")
        assert writer.wait(30) == 0, writer.lines
        done = next(line for line in writer.lines if line.startswith("done"))
        assert done.endswith("[5]"), f"one EIO reports the unsynced writes the crash may have lost: {done}"
        for node in (first, member):
            content = (node.mount / "work" / "log").read_bytes()
            assert content[: len(expected(synced_at + 1))] == expected(synced_at + 1), f"node {node.index}"
        assert reader.read_size() == 10_000
        reader.close()
        assert shell_run(shell, "echo again > after && cat after") == ["again"]
        shell.stdin.close()  # type: ignore[union-attr]
        assert shell.wait(30) == 0
        assert (first.mount / "work" / "after").read_text() == "again\n"

        # Files deleted after the crash, here and on another member, are deleted for good: the
        # restarted member cannot know which inodes the dead daemon's handles keep, but one the
        # kernel does not even cache is held by nothing, and one it evicts it forgets.
        for node, name in ((member, "deleted-here"), (first, "deleted-there")):
            path = node.mount / "work" / name
            path.write_bytes(b"d" * 100_000)
            path.unlink()
        wait_for(lambda: first.status()["metadata"]["orphans"] == 0, 60,
                 "the files deleted after the crash to be purged")
