"""Faults in a real three-node cluster (tests/support/cluster.py: separate `awsomefsd` processes in
network namespaces, one shared image file, short leases: 3 s lease, 0.5 s renewal, 1 s margin, 8 s
stall budget).

What is checked:
- the leader is SIGKILLed during a create storm from every node: every create a survivor acknowledged
  is there with its bytes on both survivors; of the killed node's, which ran ahead of the log and
  were not synced, what survives is a prefix of its changes (docs/delegations.md, Faults), and
  nothing acknowledged well before the kill is lost; a new leader is elected, creates resume; the
  stall is measured;
- a paused (SIGSTOP) writer is expired, another node writes the file, and the woken writer's buffered
  writes are dropped (close reports EIO) instead of landing on the device; it then works again;
- a partitioned node's writes fail with EIO within lease + stall budget while the majority keeps
  working; after healing it catches up and writes again;
- appends (O_APPEND + fsync) and renames from three nodes at once: every acknowledged record exactly
  once, whole, in each node's order; the same file and the same directory on every node;
- the cluster listener refuses a client without a certificate and one with a self-signed or foreign
  certificate; the members go on working;
- a follower paused past its lease while appending wakes up, rejoins under a new epoch by itself
  and appends again (its daemon used to exit: a background proposal refused for the old epoch).

A file operation on a mount that may hang (its node stopped or cut off) runs on a thread with a
bounded wait (`bounded`), so a failure is reported, never a hung test run.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from awsomefsd.cli.cluster import CLUSTER_ENTRY_TIMEOUT_S
from awsomefsd.cli.devcluster.network import PrivateNetwork
from awsomefsd.cluster.ca import ClusterCA, make_csr, new_node_key, node_dns_name
from awsomefsd.cluster.rpc import control_call
from awsomefsd.cluster.state import MemberState, control_socket
from tests.support.cluster import PORT, Cluster, Node, cluster_in
from tests.support.daemon import wait_for
from tests.support.nemesis import Workers, load_history

T = TypeVar("T")
OP_TIMEOUT_S = 30.0  # one file operation on a healthy node (a lease hand-over, an election)
LEASE_S, STALL_S = 3.0, 8.0  # tests.support.cluster.FAST_LEASES


# --- helpers ---------------------------------------------------------------------------------------
def bounded(fn: Callable[[], T], timeout_s: float = OP_TIMEOUT_S, what: str = "file operation") -> T:
    """fn() on a daemon thread: its result or its exception, or TimeoutError after `timeout_s` (the
    thread is abandoned: a stopped node's mount may never answer; teardown aborts the mount)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=what)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f}s")
    if "error" in box:
        box["error"].add_note(f"(in: {what})")
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def hung(nodes: list[Node]) -> str:
    """Threads waiting in the kernel: the daemons' in uninterruptible sleep, and this process's in a
    FUSE request (a file operation waiting for a daemon)."""
    ours = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            wchan = (task / "wchan").read_text().strip()
            if "fuse" in wchan or wchan == "request_wait_answer":
                ours.append(f"{(task / 'comm').read_text().strip()}@{wchan}")
        except OSError:
            continue
    parts = [f"node {n.index}: {n.blocked_threads()}" for n in nodes if n.blocked_threads()]
    return "; ".join([*parts, f"test threads: {ours}"] if ours else parts) or "none"


def wait_or_explain(condition: Callable[[], bool], timeout_s: float, what: str, nodes: list[Node]) -> None:
    """wait_for, with the threads stuck in the kernel in the failure message."""
    try:
        wait_for(condition, timeout_s, what, interval_s=0.05)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; threads waiting in the kernel: {hung(nodes)}") from None


def read(path: Path) -> bytes:
    """The whole file; open, read and close each raise on their own line (close reports write errors)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, f"closing {path} after reading it: {exc.strerror}") from None
    return b"".join(chunks)


def write(path: Path, data: bytes) -> None:
    """Create or replace the contents, fsync, close (every step may raise)."""
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def cluster_view(node: Node) -> dict[str, Any]:
    """What `status --json` shows under "cluster", asked on the control socket from this process.
    Not through the CLI: a forked child closes every descriptor it inherited, and closing one open
    on a FUSE file sends FLUSH, which waits for ever when that file's node is stopped."""
    return control_call(str(control_socket(node.state)), {"op": "status"}, timeout_s=10)


def member(observer: Node, node: Node) -> dict[str, Any]:
    """`node`'s record in `observer`'s status (expired, lease epoch, role...)."""
    return next(n for n in cluster_view(observer)["nodes"] if n["id"] == node.node_id)


def alive(node: Node) -> bool:
    return node.proc is not None and node.proc.poll() is None


def wait_leader(cluster: Cluster, among: list[Node], timeout_s: float = 30.0) -> Node:
    found: list[Node] = []

    def elected() -> bool:
        try:
            found[:] = [cluster.leader(among)]
        except (LookupError, ValueError, KeyError):
            return False
        return True

    wait_for(elected, timeout_s, "a leader among " + ", ".join(str(n.index) for n in among), interval_s=0.2)
    return found[0]


def wait_renewed(node: Node, observers: list[Node], timeout_s: float = 30.0) -> None:
    """Until `node` holds a live lease again (its fence open) and no observer counts it expired."""
    def renewed() -> bool:
        lease = cluster_view(node).get("lease") or {}
        return bool(lease.get("fence_open")) and not any(member(o, node)["expired"] for o in observers)

    wait_for(renewed, timeout_s, f"node {node.index} renewing its lease", interval_s=0.2)


# --- 1. the leader dies during a create storm ---------------------------------------------------------
class CreateStorm(threading.Thread):
    """Creates n<index>-<seq> files in `directory` as fast as it can: O_CREAT|O_EXCL, a few bytes,
    close. A create counts as acknowledged when close returned."""

    def __init__(self, node: Node, directory: Path) -> None:
        super().__init__(daemon=True, name=f"storm-{node.index}")
        self.node = node
        self.directory = directory
        self.halt = threading.Event()
        self.acked: list[tuple[str, float, float]] = []  # name, started, acknowledged (monotonic)
        self.errors: list[tuple[str, float, str]] = []  # name, when, "step: errno name"

    @staticmethod
    def payload(name: str) -> bytes:
        return f"{name} was here\n".encode() * 3

    def run(self) -> None:
        seq = 0
        while not self.halt.is_set():
            name = f"n{self.node.index}-{seq:06d}"
            seq += 1
            started = time.monotonic()
            failure = self.create(name)
            if failure:
                self.errors.append((name, time.monotonic(), failure))
                self.halt.wait(0.05)  # a dead mount fails at once: do not spin
            else:
                self.acked.append((name, started, time.monotonic()))

    def create(self, name: str) -> str:
        """One create: "" once close returned, else the failed step and its errno."""
        try:
            fd = os.open(self.directory / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as exc:
            return f"create: {errno.errorcode.get(exc.errno or 0, exc)}"
        try:
            os.write(fd, self.payload(name))
        except OSError as exc:
            try:
                os.close(fd)
            except OSError:
                pass
            return f"write: {errno.errorcode.get(exc.errno or 0, exc)}"
        try:
            os.close(fd)
        except OSError as exc:
            return f"close: {errno.errorcode.get(exc.errno or 0, exc)}"
        return ""

    def acked_after(self, t: float) -> int:
        return sum(1 for _, _, done in self.acked if done > t)


KILLED_NODE_LAG_S = 2.0
"""How far the killed node's log may lag its acknowledgements: a create it acknowledged longer than
this before it died must have committed (batches go every 20 ms; a busy 2-core machine, slower)."""


def create_state(directory: Path, name: str) -> str:
    """"whole" (the storm's bytes), "absent", "empty" (created, its data mapping not committed), or
    what else was read."""
    try:
        data = read(directory / name)
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    if data == CreateStorm.payload(name):
        return "whole"
    return "empty" if not data else f"{len(data)} other bytes"


def not_a_committed_prefix(states: list[tuple[str, float, str]], safe_before: float) -> str:
    """Why the killed node's creates, in its order as (name, acknowledged, state), are not what a
    committed prefix of its changes (create, data mapping, create, ...) leaves: some whole, then at
    most one empty, then absent ones, none acknowledged before `safe_before`; "" when they are."""
    expected = "whole"
    for name, done, state in states:
        if state not in ("whole", "empty", "absent"):
            return f"{name} is {state}"
        if state != "whole" and done < safe_before:
            return f"{name}, acknowledged {safe_before - done:.2f}s before the lag allowed, is {state}"
        if state == expected or (expected == "whole" and state in ("empty", "absent")):
            expected = "whole" if state == "whole" else "absent"
            continue
        return f"{name} is {state} after an earlier create was lost (not a prefix of its changes)"
    return ""


@pytest.mark.serial  # asserts the stall in wall-clock seconds
def test_leader_killed_during_create_storm(cluster3: Cluster, record_property: Callable[[str, object], None]) -> None:
    nodes = cluster3.form(3)
    storm_dir = nodes[0].mount / "storm"
    storm_dir.mkdir()
    storms = {n.index: CreateStorm(n, n.mount / "storm") for n in nodes}
    began = time.monotonic()
    for storm in storms.values():
        storm.start()
    wait_or_explain(lambda: time.monotonic() - began >= 1.5 and all(s.acked for s in storms.values()), 30,
                    "every node acknowledging creates", nodes)

    leader = cluster3.leader(nodes)
    survivors = [n for n in nodes if n is not leader]
    killed = storms[leader.index]
    killed.halt.set()
    killed_at = time.monotonic()
    try:
        leader.kill()
    except subprocess.TimeoutExpired:
        pytest.fail(f"SIGKILL did not end the leader; threads waiting in the kernel: {hung(nodes)}")
    surviving = [storms[n.index] for n in survivors]
    wait_or_explain(lambda: time.monotonic() - killed_at >= 4.0 and all(s.acked_after(killed_at) >= 5 for s in surviving),
                    60, "creates resuming on both survivors", survivors)
    for storm in storms.values():
        storm.halt.set()
    for storm in storms.values():
        storm.join(OP_TIMEOUT_S)
        assert not storm.is_alive(), f"node {storm.node.index}'s storm hangs in a file operation"

    new_leader = wait_leader(cluster3, survivors)
    assert new_leader in survivors

    # the stall: the longest gap between consecutive acknowledged creates on the survivors around the kill
    acks = sorted(done for s in surviving for _, _, done in s.acked)
    before = [t for t in acks if t <= killed_at]
    window = [before[-1] if before else killed_at] + [t for t in acks if t > killed_at]
    stall_s = max(b - a for a, b in itertools.pairwise(window))
    slowest_s = max((done - start for s in surviving for _, start, done in s.acked if done > killed_at - 1),
                    default=0.0)
    counts = {f"node {s.node.index}": len(s.acked) for s in storms.values()}
    errors = {f"node {s.node.index}": s.errors[:5] for s in surviving if s.errors}
    print(f"\nleader kill: stall {stall_s:.2f}s (longest single create {slowest_s:.2f}s); creates {counts}; "
          f"survivor errors {errors}")
    record_property("stall_after_leader_kill_s", round(stall_s, 3))
    record_property("slowest_create_after_kill_s", round(slowest_s, 3))

    assert killed.acked, "the leader acknowledged no create"
    for node in survivors:
        base = node.mount / "storm"

        def survivors_wrong(base: Path = base) -> list[str]:
            return [f"{name}: {state}" for s in surviving for name, _, _ in s.acked
                    if (state := create_state(base, name)) != "whole"]

        def killed_states(base: Path = base) -> list[tuple[str, float, str]]:
            return [(name, done, create_state(base, name)) for name, _, done in killed.acked]

        wrong = bounded(survivors_wrong, 120, f"reading every acknowledged file on node {node.index}")
        assert not wrong, f"node {node.index} lost creates a survivor acknowledged: {wrong[:10]} ({len(wrong)} in all)"
        states = bounded(killed_states, 120, f"reading the killed node's files on node {node.index}")
        lost = [f"{name}: {state}" for name, _, state in states if state != "whole"]
        print(f"node {node.index}: of the killed node's {len(states)} acknowledged creates, lost {lost}")
        problem = not_a_committed_prefix(states, killed_at - KILLED_NODE_LAG_S)
        assert not problem, f"node {node.index}, the killed node's creates: {problem}"
    listings = [bounded(lambda n=n: sorted(os.listdir(n.mount / "storm"))) for n in survivors]
    assert listings[0] == listings[1], "the survivors list different directories"
    assert stall_s < 15.0, f"creates stalled {stall_s:.1f}s after the leader died"
    # The stall budget (8 s) is far longer than the stall: no create on a survivor may fail. EEXIST on a
    # fresh name means one create was applied twice; "blocks ... are not free" in a log, a data write.
    failed = [e for s in surviving for e in s.errors]
    complaints = [line.strip() for n in survivors for line in n.output if " ERROR " in line]
    assert not failed, f"creates failed on the survivors: {failed}; their logged errors: {complaints[:6]}"


# --- 2. a paused writer wakes up after the cluster expired it -----------------------------------------
def test_stale_writer_after_sigstop_gets_eio(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> None:
    # a long flush interval keeps B's unsynced write in its buffer until it is paused
    with cluster_in(netns_network(3), tmp_path, env={"AWSOMEFS_DATA__FLUSH_INTERVAL_MS": "60000"}) as cluster:
        nodes = cluster.form(3)
        leader = cluster.leader(nodes)
        b = next(n for n in nodes if n is not leader)
        a, c = (n for n in nodes if n is not b)
        v1 = b"version 1\n" * 100
        unsynced = b"U" * 5000
        v2 = b"version 2 from the other node\n" * 100
        # from here until the close no subprocess may be started (see cluster_view)
        fd = os.open(b.mount / "f", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.pwrite(fd, v1, 0)
            os.fsync(fd)
            os.pwrite(fd, unsynced, len(v1))  # buffered in B's daemon, not on the device
            b.signal(signal.SIGSTOP)
            paused_at = time.monotonic()
            try:
                wait_for(lambda: member(a, b)["expired"], 30, f"node {b.index} expired in node {a.index}'s status",
                         interval_s=0.2)
                print(f"\nnode {b.index} expired {time.monotonic() - paused_at:.1f}s after SIGSTOP")
                bounded(lambda: write(a.mount / "f", v2), what="writing version 2 on A")
            finally:
                b.signal(signal.SIGCONT)
            with pytest.raises(OSError) as closed:
                bounded(lambda: os.close(fd), what="close on the woken node")
            fd = -1
            assert closed.value.errno == errno.EIO, closed.value
        finally:
            if fd >= 0:
                try:
                    bounded(lambda: os.close(fd), what="close on B (cleanup)")
                except (OSError, TimeoutError):
                    pass
        wait_for(lambda: "dropped the buffered writes" in b.logs(), 30, "B logging its dropped writes")
        wait_renewed(b, [a, c])
        problems = []  # every check below runs; all that fail are reported together

        def expect(node: Node, want: bytes, what: str) -> None:
            try:
                got = bounded(lambda: read(node.mount / "f"), what=f"reading f on node {node.index}")
            except OSError as exc:
                problems.append(f"{what}: reading on node {node.index}: {exc}")
                return
            if got != want:
                problems.append(f"{what}: node {node.index} reads {len(got)} bytes: {got[:32]!r}...")

        for node in (a, c, b):
            expect(node, v2, "version 2")
        # B works again: it takes the file's write lease back from A
        v3 = b"version 3 from the woken node\n" * 50
        bounded(lambda: write(b.mount / "f", v3), what="writing version 3 on B")
        for node in (a, c, b):
            expect(node, v3, "version 3, written on B after it recovered (write, fsync and close succeeded)")
        assert not problems, "\n".join(problems)


# --- 3. a partitioned node is fenced, then rejoins ----------------------------------------------------
@pytest.mark.serial  # asserts how soon the cut-off node is fenced, in wall-clock seconds
def test_partitioned_node_is_fenced_and_rejoins(cluster3: Cluster) -> None:
    nodes = cluster3.form(3)
    a = cluster3.leader(nodes)
    b, c = (n for n in nodes if n is not a)
    write(c.mount / "cfile", b"before the partition\n")
    fd = os.open(c.mount / "cfile", os.O_WRONLY)  # C holds the file's write lease
    # until this descriptor is closed, no subprocess may start once C is cut off (see cluster_view)
    cut_at = time.monotonic()
    cluster3.network.set_link(c.ns, False)
    try:
        def write_and_fsync() -> None:
            os.pwrite(fd, b"during the partition\n", 0)
            os.fsync(fd)

        bound_s = LEASE_S + STALL_S + 10.0
        with pytest.raises(OSError) as failed:
            bounded(write_and_fsync, bound_s + 30, "write+fsync on the cut-off node")
        fenced_after_s = time.monotonic() - cut_at
        print(f"\npartitioned node's write+fsync failed after {fenced_after_s:.1f}s: {failed.value}")
        assert failed.value.errno == errno.EIO, failed.value
        assert fenced_after_s < bound_s, f"the cut-off node kept a write pending for {fenced_after_s:.1f}s"

        # the majority keeps working, and expires C
        bounded(lambda: write(a.mount / "during", b"written during the partition\n"), what="write on A")
        assert bounded(lambda: read(b.mount / "during")) == b"written during the partition\n"
        bounded(lambda: write(b.mount / "during-b", b"from B\n"), what="write on B")
        assert bounded(lambda: read(a.mount / "during-b")) == b"from B\n"
        wait_for(lambda: member(a, c)["expired"], 30, f"node {c.index} expired in the leader's status", interval_s=0.2)
    finally:
        try:
            bounded(lambda: os.close(fd), what="closing the fenced descriptor")
        except OSError:
            pass  # its write was refused; what close says about that is not the point here
        finally:
            cluster3.network.set_link(c.ns, True)

    def catches_up() -> bool:
        try:
            return bounded(lambda: read(c.mount / "during"), 20, "read on C") == b"written during the partition\n"
        except (OSError, TimeoutError):
            return False

    wait_for(catches_up, 90, "node C reading what A wrote during the partition", interval_s=0.5)
    wait_renewed(c, [a, b], 60)
    problems = []  # both writes are tried; what fails is reported together
    for name, data, reader in (("after", b"C writes again\n", a), ("cfile", b"rewritten after the partition\n", b)):
        try:
            bounded(lambda name=name, data=data: write(c.mount / name, data), what=f"writing {name} on C")
            got = bounded(lambda name=name, reader=reader: read(reader.mount / name))
        except OSError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if got != data:
            problems.append(f"{name} written on C reads {got!r} on node {reader.index}")
    assert not problems, "after healing, C cannot write: " + "; ".join(problems)


# --- 3b. an operation on a cut-off node fails within the stall budget, not twice it --------------------
PROPOSAL_TIMEOUT_S = 10.0  # NodeSettings.proposal_timeout_s: a forwarded proposal waits at least this


def test_a_cut_off_node_fails_a_lookup_within_the_stall_budget(cluster3: Cluster) -> None:
    """A lookup on a cut-off node that needs the log (the directory's delegation is another node's)
    fails with EIO after the stall; the kernel, whose cached name it was revalidating, then looks
    the name up again, and that repeat must fail at once, not wait a second budget (54 s were
    seen with the default 30 s budget)."""
    nodes = cluster3.form(3)
    leader = cluster3.leader(nodes)
    holder, cut = [n for n in nodes if n is not leader]
    (holder.mount / "held").mkdir()
    write(holder.mount / "held" / "f", b"x")
    stop = threading.Event()

    def keep_creating() -> None:  # the holder keeps the directory's delegation (it is never idle)
        for i in itertools.count():
            if stop.wait(0.2):
                return
            (holder.mount / "held" / f"c{i}").write_bytes(b"")

    creator = threading.Thread(target=keep_creating, daemon=True)
    creator.start()
    try:
        wait_for(lambda: (cut.mount / "held" / "f").exists(), 30, "the file seen on the node to be cut off")
        time.sleep(CLUSTER_ENTRY_TIMEOUT_S + 0.5)  # its name cache entry expires: the next stat revalidates
        cluster3.network.set_link(cut.ns, False)
        try:
            began = time.monotonic()
            with pytest.raises(OSError) as failed:
                bounded(lambda: os.stat(cut.mount / "held" / "f"), 120, "stat on the cut-off node")
            took = time.monotonic() - began
        finally:
            cluster3.network.set_link(cut.ns, True)
    finally:
        stop.set()
        creator.join(OP_TIMEOUT_S)
    print(f"\nstat on the cut-off node failed after {took:.1f}s: {failed.value}")
    assert failed.value.errno == errno.EIO, failed.value
    budget = max(STALL_S, PROPOSAL_TIMEOUT_S)
    assert took < budget * 1.5, f"the stat waited {took:.1f}s, past the stall budget ({budget:.0f}s)"


# --- 4. appends and renames from three nodes at once --------------------------------------------------
RECORD_BYTES = 64
APPENDS_PER_NODE = 20
RENAMES_PER_NODE = 8
CONTESTED = 4
RENAME_NOREPLACE = 1
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def rename_noreplace(old: Path, new: Path) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(new))


def record(node: int, seq: int) -> bytes:
    head = f"node={node} seq={seq:05d} "
    return (head + "." * (RECORD_BYTES - len(head) - 1) + "\n").encode()


class Appender(threading.Thread):
    def __init__(self, node: Node, path: Path, start: threading.Barrier) -> None:
        super().__init__(daemon=True, name=f"append-{node.index}")
        self.node, self.path, self.start_barrier = node, path, start
        self.acked: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                self.start_barrier.wait(OP_TIMEOUT_S)
                for seq in range(APPENDS_PER_NODE):
                    rec = record(self.node.index, seq)
                    assert os.write(fd, rec) == len(rec)
                    os.fsync(fd)
                    self.acked.append(seq)
            finally:
                os.close(fd)
        except BaseException as exc:
            self.error = exc


class Renamer(threading.Thread):
    """Its own files k-i.a -> .b -> .c; k-o<j> over the shared over-<j> (replacing); k-x<j> onto
    excl-<j> with RENAME_NOREPLACE (exactly one node may win each)."""

    def __init__(self, node: Node, directory: Path, start: threading.Barrier) -> None:
        super().__init__(daemon=True, name=f"rename-{node.index}")
        self.node, self.dir, self.start_barrier = node, directory, start
        self.moved: list[int] = []  # i whose a->b->c both returned
        self.replaced: list[int] = []  # j whose rename over over-<j> returned
        self.won: list[int] = []  # j whose RENAME_NOREPLACE onto excl-<j> returned
        self.lost: list[int] = []  # ... and those refused with EEXIST
        self.error: BaseException | None = None

    def prepare(self) -> None:
        k = self.node.index
        for i in range(RENAMES_PER_NODE):
            (self.dir / f"{k}-{i}.a").write_bytes(f"{k}-{i}".encode())
        for j in range(CONTESTED):
            (self.dir / f"{k}-o{j}").write_bytes(f"{k}-o{j}".encode())
            (self.dir / f"{k}-x{j}").write_bytes(f"{k}-x{j}".encode())

    def run(self) -> None:
        k = self.node.index
        try:
            self.start_barrier.wait(OP_TIMEOUT_S)
            for i in range(RENAMES_PER_NODE):
                os.rename(self.dir / f"{k}-{i}.a", self.dir / f"{k}-{i}.b")
                os.rename(self.dir / f"{k}-{i}.b", self.dir / f"{k}-{i}.c")
                self.moved.append(i)
                j = i % CONTESTED
                if i < CONTESTED:
                    os.rename(self.dir / f"{k}-o{j}", self.dir / f"over-{j}")
                    self.replaced.append(j)
                    try:
                        rename_noreplace(self.dir / f"{k}-x{j}", self.dir / f"excl-{j}")
                        self.won.append(j)
                    except OSError as exc:
                        if exc.errno != errno.EEXIST:
                            raise
                        self.lost.append(j)
        except BaseException as exc:
            self.error = exc


def test_concurrent_appends_and_renames_from_three_nodes(cluster3: Cluster) -> None:
    nodes = cluster3.form(3)
    first = nodes[0]
    (first.mount / "ren").mkdir()
    (first.mount / "log").write_bytes(b"")
    start = threading.Barrier(2 * len(nodes))
    appenders = [Appender(n, n.mount / "log", start) for n in nodes]
    renamers = [Renamer(n, n.mount / "ren", start) for n in nodes]
    for r in renamers:
        bounded(r.prepare, what=f"creating node {r.node.index}'s files")
    began = time.monotonic()
    for t in [*appenders, *renamers]:
        t.start()
    wait_or_explain(lambda: not any(t.is_alive() for t in [*appenders, *renamers]), 120,
                    "the appenders and renamers to finish", nodes)
    print(f"\n{len(nodes) * APPENDS_PER_NODE} appends and {len(nodes) * (2 * RENAMES_PER_NODE + 2 * CONTESTED)} "
          f"renames in {time.monotonic() - began:.1f}s")
    for t in [*appenders, *renamers]:
        assert t.error is None, f"{t.name}: {t.error!r}"

    failures = []  # both halves are checked; what fails in either is reported together
    for check in (check_appended_log, check_renamed_directory):
        try:
            check(nodes, appenders, renamers)
        except (AssertionError, TimeoutError) as exc:
            failures.append(f"{check.__name__}: {exc}")
    assert not failures, "\n".join(failures)


def check_appended_log(nodes: list[Node], appenders: list[Appender], _renamers: list[Renamer]) -> None:
    """The same bytes on every node; every acknowledged record once, whole, in each node's order."""
    contents = [bounded(lambda n=n: read(n.mount / "log")) for n in nodes]
    for node, data in zip(nodes[1:], contents[1:]):
        assert data == contents[0], f"node {node.index} reads another log ({len(data)} vs {len(contents[0])} bytes)"
    data = contents[0]
    acked = {(a.node.index, seq) for a in appenders for seq in a.acked}
    assert len(data) % RECORD_BYTES == 0, f"log of {len(data)} bytes: a torn record"
    found = [data[i : i + RECORD_BYTES] for i in range(0, len(data), RECORD_BYTES)]
    valid = {record(k, seq): (k, seq) for k in (n.index for n in nodes) for seq in range(APPENDS_PER_NODE)}
    torn = [rec for rec in found if rec not in valid]
    assert not torn, f"torn or interleaved records: {torn[:3]}"
    seen = [valid[rec] for rec in found]
    assert len(seen) == len(set(seen)), "a record appears twice"
    missing = acked - set(seen)
    per_node = {k: sum(1 for node, _ in seen if node == k) for k in (n.index for n in nodes)}
    assert not missing, (f"{len(missing)} of {len(acked)} acknowledged records missing from the log "
                         f"({len(data)} bytes, records per node {per_node}), e.g. {sorted(missing)[:5]}")
    for k in (n.index for n in nodes):
        mine = [seq for node, seq in seen if node == k]
        assert mine == sorted(mine), f"node {k}'s records out of order: {mine}"


def check_renamed_directory(nodes: list[Node], _appenders: list[Appender], renamers: list[Renamer]) -> None:
    """What the acknowledged renames say, the same on every node."""
    expected: dict[str, bytes | None] = {}
    for r in renamers:
        k = r.node.index
        assert r.moved == list(range(RENAMES_PER_NODE))
        for i in r.moved:
            expected[f"{k}-{i}.c"] = f"{k}-{i}".encode()
        for j in r.lost:
            expected[f"{k}-x{j}"] = f"{k}-x{j}".encode()
    for j in range(CONTESTED):
        winners = [r.node.index for r in renamers if j in r.won]
        assert len(winners) == 1, f"excl-{j}: RENAME_NOREPLACE succeeded on nodes {winners}"
        assert sum(j in r.lost for r in renamers) == len(nodes) - 1
        expected[f"excl-{j}"] = f"{winners[0]}-x{j}".encode()
        expected[f"over-{j}"] = None  # the last of the three replacing renames: any node's file

    listings: dict[int, list[str]] = {}

    def listed_as_expected() -> bool:
        listings.update({n.index: bounded(lambda n=n: sorted(os.listdir(n.mount / "ren"))) for n in nodes})
        return all(names == sorted(expected) for names in listings.values())

    try:
        wait_for(listed_as_expected, 10, "every node listing exactly the acknowledged renames", interval_s=0.2)
    except TimeoutError as exc:
        diffs = {k: sorted(set(names) ^ set(expected)) for k, names in listings.items()}
        raise AssertionError(f"{exc}; names differing from the expected, per node: {diffs}") from None
    for node in nodes:
        for name, want in expected.items():
            got = bounded(lambda node=node, name=name: read(node.mount / "ren" / name))
            if want is None:
                assert got in {f"{k}-o{name[5:]}".encode() for k in (n.index for n in nodes)}, (name, got)
            else:
                assert got == want, f"node {node.index}: {name} holds {got!r}, not {want!r}"
    overs = [[bounded(lambda n=n, j=j: read(n.mount / "ren" / f"over-{j}")) for j in range(CONTESTED)] for n in nodes]
    assert overs[0] == overs[1] == overs[2], "nodes disagree about who renamed last"


# --- 5. the cluster listener wants a cluster certificate ----------------------------------------------
PROBE = r"""
import sys, grpc
target, name, ca, key, cert = sys.argv[1:6]
pem = lambda p: open(p, "rb").read() if p != "-" else None
creds = grpc.ssl_channel_credentials(root_certificates=pem(ca), private_key=pem(key), certificate_chain=pem(cert))
options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]
with grpc.secure_channel(target, creds, options=options) as channel:
    try:
        channel.unary_unary("/awsomefs.cluster.v1.Member/Forward")(b"", timeout=10)
        print("OK")
    except grpc.RpcError as exc:
        print(exc.code().name, (exc.details() or "").replace("\n", " "))
"""


def self_signed_like(real: x509.Certificate) -> tuple[bytes, bytes]:
    """A certificate with the real node's subject and names, signed by its own new key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = real.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    cert = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.subject)
            .public_key(key.public_key()).serial_number(real.serial_number)
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False).sign(key, hashes.SHA256()))
    return pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_no_certificate_is_refused(cluster3: Cluster, tmp_path: Path) -> None:
    a, b, c = cluster3.form(3)
    state = MemberState.load(b.state)
    assert state is not None
    name = node_dns_name(state.cluster_uuid, b.node_id)
    tls_a = a.state / "tls"
    creds = tmp_path / "creds"
    creds.mkdir()
    fake_key, fake_cert = self_signed_like(x509.load_pem_x509_certificate((tls_a / "node.crt").read_bytes()))
    (creds / "self.key").write_bytes(fake_key)
    (creds / "self.crt").write_bytes(fake_cert)
    foreign_ca = ClusterCA.create(uuid.uuid4())
    foreign_key = new_node_key()
    (creds / "foreign.key").write_bytes(pem_key(foreign_key))
    (creds / "foreign.crt").write_bytes(
        foreign_ca.issue(make_csr(foreign_key), a.node_id).public_bytes(serialization.Encoding.PEM))

    def probe(key: Path | str, cert: Path | str) -> str:
        """From A's namespace to B's cluster listener: the gRPC status of one Forward call."""
        proc = a.ns.run([sys.executable, "-c", PROBE, f"{b.ns.address}:{PORT}", name, str(tls_a / "ca.crt"),
                         str(key), str(cert)], capture_output=True, text=True, env=cluster3.env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    # control: A's own credentials get through the handshake to the handler (which refuses the empty entry)
    with_member_cert = probe(tls_a / "node.key", tls_a / "node.crt")
    assert with_member_cert.split()[0] in ("FAILED_PRECONDITION", "INVALID_ARGUMENT"), with_member_cert
    refused = {
        "no client certificate": probe("-", "-"),
        "self-signed certificate": probe(creds / "self.key", creds / "self.crt"),
        "another cluster's certificate": probe(creds / "foreign.key", creds / "foreign.crt"),
    }
    print(f"\nmember certificate: {with_member_cert}; " + "; ".join(f"{k}: {v}" for k, v in refused.items()))
    for what, outcome in refused.items():
        assert outcome.split()[0] == "UNAVAILABLE", f"{what}: {outcome}"

    assert all(alive(n) for n in (a, b, c))
    bounded(lambda: write(a.mount / "after-probes", b"still fine\n"), what="write on A")
    for node in (b, c):
        assert bounded(lambda node=node: read(node.mount / "after-probes")) == b"still fine\n"
    assert not any(n["expired"] for n in b.status()["cluster"]["nodes"])


# --- 6. a writer paused past its lease wakes up, rejoins and appends again ----------------------------
def test_paused_appender_wakes_rejoins_and_appends_again(netns_network: Callable[[int], PrivateNetwork],
                                                        tmp_path: Path) -> None:
    """SIGSTOP a follower while it appends (fsync after each record), past its lease, then SIGCONT,
    twice: the daemon must not exit (a background proposal refused for the expired epoch used to end
    it: the delayed-free reclaimer's, which finds frees due at once on waking, hence the short grace
    period here); it renews under the new epoch by itself and its writer's appends go through again."""
    with cluster_in(netns_network(3), tmp_path, env={"AWSOMEFS_DATA__DELAYED_FREE_MS": "100"}) as cluster:
        paused_appender_round_trips(cluster, tmp_path, rounds=2)


def lease_open(node: Node) -> bool:
    try:
        return bool((cluster_view(node).get("lease") or {}).get("fence_open"))
    except ConnectionError:
        return False


def paused_appender_round_trips(cluster3: Cluster, tmp_path: Path, rounds: int) -> None:
    nodes = cluster3.form(3)
    leader = cluster3.leader(nodes)
    b = next(n for n in nodes if n is not leader)
    others = [n for n in nodes if n is not b]
    for directory in ("ns", "tmp", "logs"):
        (leader.mount / directory).mkdir()
    (leader.mount / "logs" / "s0").write_bytes(b"")
    # the appender runs in its own process: this one forks (status) while B is stopped
    workers = Workers([b], tmp_path, seed=11, clients=1, t0=time.monotonic(), until=time.monotonic() + 600,
                      env=cluster3.env)
    history = workers.paths[0]

    def acked_after(t: float) -> int:
        return sum(1 for e in load_history([history]) if e["op"] == "append" and e["output"] == "ok" and e["t0"] > t)

    try:
        workers.wait_ready()
        wait_for(lambda: acked_after(0) >= 5, 60, "the appender on B acknowledging records", interval_s=0.2)
        for _ in range(rounds):
            b.signal(signal.SIGSTOP)
            try:
                wait_for(lambda: member(others[0], b)["expired"], 30, "B expired while paused", interval_s=0.2)
            finally:
                b.signal(signal.SIGCONT)
            woke = time.monotonic()
            wait_for(lambda: not alive(b) or lease_open(b), 30, "B renewing its lease (or exiting)", interval_s=0.2)
            assert alive(b), f"node {b.index} exited after waking up:\n{b.logs(40)}"
            wait_renewed(b, others, 30)
            wait_for(lambda woke=woke: acked_after(woke) >= 5, 60, "B's appender acknowledging records after the wake",
                     interval_s=0.2)
            assert alive(b), f"node {b.index} exited after waking up:\n{b.logs(40)}"
    finally:
        problems = workers.stop()
    assert not problems, problems
    assert "rejoining under the new epoch" in b.logs(400), b.logs(60)
    entries = load_history([history])
    failures = [e for e in entries if e["output"] not in ("ok", "EIO")]
    assert not failures, failures[:5]
    if any(e["output"] == "EIO" for e in entries):  # each EIO says on its node why (and which file)
        assert "EIO to " in b.logs(2000), b.logs(60)
