"""Histories of metadata operations on a real 3-node cluster, with the leader killed in the middle,
checked by the linearizability checker of the Raft work (tests/support/linearizability.py).

Each key is a register kept in the namespace itself: `put` writes a fresh file and renames it over
the key's name (the rename is the one metadata mutation that makes the value current), `get` opens
the name and reads it. Clients on every node run concurrently through their node's FUSE mount, with
`[mount] coherence = "strict"`: the kernel caches no names, and each lookup catches up with the
leader, so every operation must see every change completed anywhere before it began
(docs/coherence.md). Operations whose outcome a client could not learn (its node was killed, or the
call failed) count as "may have happened" for puts and are dropped for gets.
"""

from __future__ import annotations

import errno
import math
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from awsomefsd.cli.devcluster.network import PrivateNetwork
from tests.support.cluster import Node, cluster_in
from tests.support.linearizability import UNKNOWN, Operation, check_history

KEYS = ("r0", "r1", "r2")
RUN_S = 8.0
KILL_AT_S = 3.0
GONE = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ESTALE)


class Recorder:
    def __init__(self) -> None:
        self.ops: list[Operation] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.ended: dict[int, BaseException] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, op: Operation) -> None:
        with self.lock:
            self.ops.append(op)


def client(node: Node, client_id: int, rec: Recorder, stop: threading.Event, seed: int) -> None:
    try:
        run_client(node, client_id, rec, stop, seed)
    except BaseException as exc:  # surfaces in the test, not as a thread warning
        rec.ended[client_id] = exc
        raise


def run_client(node: Node, client_id: int, rec: Recorder, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    seq = 0
    while not stop.is_set():
        key = rng.choice(KEYS)
        path = node.mount / key
        if rng.random() < 0.5:
            seq += 1
            value = f"c{client_id}-{seq}"
            tmp = node.mount / f".tmp-{client_id}-{seq}"
            call = rec.now()
            try:
                tmp.write_bytes(value.encode())
                tmp.rename(path)
            except OSError as exc:
                rec.add(Operation(client_id, "put", key, value, UNKNOWN, call, math.inf))
                rec.ended[client_id] = exc
                return  # this node is gone or failing: a client stops at its first unknown outcome
            rec.add(Operation(client_id, "put", key, value, None, call, rec.now()))
        else:
            call = rec.now()
            try:
                value_read: str | None = path.read_bytes().decode()
            except FileNotFoundError:
                value_read = None
            except OSError as exc:
                if exc.errno in GONE:
                    rec.ended[client_id] = exc
                    return
                raise
            rec.add(Operation(client_id, "get", key, None, value_read, call, rec.now()))


def test_metadata_history_with_leader_kill_is_linearizable(netns_network: Callable[[int], PrivateNetwork],
                                                            tmp_path: Path) -> None:
    with cluster_in(netns_network(3), tmp_path, env={"AWSOMEFS_MOUNT__COHERENCE": "strict"}) as cluster:
        nodes = cluster.form(3)
        rec = Recorder()
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(node, 10 * node.index + k, rec, stop, 1000 * node.index + k),
                                    daemon=True)
                   for node in nodes for k in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + KILL_AT_S
        while time.monotonic() < deadline:
            time.sleep(0.05)
        victim = cluster.leader()
        victim.kill()
        deadline = time.monotonic() + (RUN_S - KILL_AT_S)
        while time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a client hung"
        survivors = [n for n in nodes if n is not victim]
        survivor_clients = {10 * n.index + k for n in survivors for k in range(2)}
        failed = {c: e for c, e in rec.ended.items() if c in survivor_clients}
        assert not failed, f"clients on surviving nodes failed: {failed}"
        after_kill = [o for o in rec.ops if o.call_time > KILL_AT_S + 0.5 and o.return_time != math.inf
                      and o.client_id // 10 in {n.index for n in survivors}]
        assert after_kill, "the survivors completed no operation after the leader was killed"
        puts = sum(1 for o in rec.ops if o.op == "put" and o.return_time != math.inf)
        gets = sum(1 for o in rec.ops if o.op == "get")
        assert puts > 20 and gets > 20, (puts, gets)
        result = check_history(rec.ops)
        assert result.ok, result.explain()
