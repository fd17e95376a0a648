"""A key-value server on the Raft node driver: the real-process test subject and benchmark target.

    python -m tests.support.raft_kv --id 1 --data-dir D --listen 127.0.0.1:7001 \\
        --peers 1=127.0.0.1:7001,2=127.0.0.2:7002,3=127.0.0.3:7003 --client 127.0.0.1:7101 --insecure

Everything is the production path: LMDB storage shared by the log and the state machine, the gRPC
transport, the trio<->grpc bridge. Only the state machine (a register per key) and the client RPC
are specific to testing. The client RPC (`awsomefs.raftkv.v1.KV`, JSON in and out) has these
methods: Put {key, value} (ordered through the log), Get {key, local} (a ReadIndex barrier first,
unless `local` asks for this replica's applied state as is), Status (the driver's status) and
Bench {proposers, seconds, payload_bytes} (load from proposers inside this process, for
bench/raft_bench.py).
Errors come back as {"error": "not_leader", "leader": id} (not applied: retry there),
{"error": "lost"} (not applied) or {"error": "timeout"} (unknown).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import grpc
import lmdb
import trio

from awsomefsd.meta.replication.driver import RaftNode
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.meta.replication.lmdb_storage import LmdbRaftStorage
from awsomefsd.meta.replication.settings import NodeSettings
from awsomefsd.meta.replication.transport import RaftTransport
from awsomefsd.rpc.bridge import Binding, BridgeLimits, serve_grpc

log = logging.getLogger(__name__)

KV_SERVICE = "awsomefs.raftkv.v1.KV"
MAP_BYTES = 1 << 30
MAX_KEY_BYTES = 1024
_KEY_LEN = struct.Struct("<H")


def encode_put(key: str, value: str) -> bytes:
    k = key.encode()
    assert len(k) <= MAX_KEY_BYTES
    return _KEY_LEN.pack(len(k)) + k + value.encode()


def _open_env(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), map_size=MAP_BYTES, max_dbs=8, sync=True, metasync=True)


class KVStateMachine:
    """A register per key in the `kv` table of the environment the Raft log shares."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "sm"
        old = data_dir / "sm.old"
        if not self.dir.exists() and old.exists():
            os.replace(old, self.dir)  # crashed between the two renames of an install
        shutil.rmtree(old, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = _open_env(self.dir)
        self.db = self.env.open_db(b"kv")

    def apply(self, txn: lmdb.Transaction[bytes], index: int, command: bytes) -> Any:
        (n,) = _KEY_LEN.unpack_from(command)
        key = command[2 : 2 + n]
        txn.put(key, command[2 + n :], db=self.db)
        return index

    def get(self, key: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(key.encode(), db=self.db)
        return None if raw is None else bytes(raw).decode()

    def install_snapshot(self, staged: Path) -> lmdb.Environment:
        """Swap directories (old aside, staged in, old removed); a crash in between is repaired
        at the next start by __init__."""
        self.env.close()
        old = self.dir.with_name("sm.old")
        os.replace(self.dir, old)
        os.replace(staged, self.dir)
        fd = os.open(self.dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
        self.env = _open_env(self.dir)
        self.db = self.env.open_db(b"kv")
        return self.env


class KVService:
    """The client RPC; JSON bodies keep the test client free of generated code."""

    def __init__(self, node: RaftNode, sm: KVStateMachine, transport: RaftTransport | None) -> None:
        self.node = node
        self.sm = sm
        self.transport = transport

    async def Put(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = json.loads(request)
        try:
            index = await self.node.propose(encode_put(req["key"], req["value"]))
        except NotLeader as exc:
            return _reply(error="not_leader", leader=exc.leader_id)
        except ProposalLost:
            return _reply(error="lost")
        except ProposalTimeout:
            return _reply(error="timeout")
        return _reply(index=index)

    async def Get(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = json.loads(request)
        if not req.get("local"):
            try:
                await self.node.read_barrier()
            except NotLeader as exc:
                return _reply(error="not_leader", leader=exc.leader_id)
        return _reply(value=self.sm.get(req["key"]))

    async def Bench(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Closed-loop load from proposers inside this process (as FUSE requests are in the
        daemon): measures the engine without a remote client's per-call cost."""
        req = json.loads(request)
        proposers, seconds, value = int(req["proposers"]), float(req["seconds"]), "x" * int(req["payload_bytes"])
        assert 1 <= proposers <= 1024 and 0 < seconds <= 60
        latencies_us: list[float] = []
        errors = 0
        end = trio.current_time() + seconds

        async def proposer(slot: int) -> None:
            nonlocal errors
            n = 0
            while trio.current_time() < end:
                t0 = trio.current_time()
                try:
                    await self.node.propose(encode_put(f"b{slot}-{n % 64}", value))
                except (NotLeader, ProposalLost, ProposalTimeout):
                    errors += 1
                    await trio.sleep(0.01)
                    continue
                latencies_us.append((trio.current_time() - t0) * 1e6)
                n += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for slot in range(proposers):
                nursery.start_soon(proposer, slot)
        elapsed = trio.current_time() - start
        latencies_us.sort()

        def q(p: float) -> float:
            return latencies_us[min(len(latencies_us) - 1, int(len(latencies_us) * p))] if latencies_us else 0.0

        batches = self.node.batch_sizes
        return _reply(count=len(latencies_us), elapsed_s=elapsed, p50_us=q(0.5), p99_us=q(0.99), errors=errors,
                      mean_batch=sum(batches) / len(batches) if batches else 0.0)

    async def Status(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        status = self.node.status()
        if self.transport is not None:
            status["transport"] = {str(k): v for k, v in self.transport.stats().items()}
        status["pid"] = os.getpid()
        return _reply(**status)


def _reply(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _add_kv_service(servicer: Any, server: grpc.Server) -> None:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name)) for name in ("Put", "Get", "Status", "Bench")
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(KV_SERVICE, handlers),))


def parse_peers(text: str) -> dict[int, str]:
    """`1=host:port,2=host:port` -> {1: "host:port", 2: "host:port"}."""
    peers = {}
    for part in text.split(","):
        node, _, address = part.partition("=")
        peers[int(node)] = address
    return peers


async def serve(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir)
    peers = parse_peers(args.peers)
    assert args.id in peers, "--peers must include this node"
    sm = KVStateMachine(data_dir)
    settings = NodeSettings(
        tick_ms=args.tick_ms, election_ticks=args.election_ticks, heartbeat_ticks=args.heartbeat_ticks,
        snapshot_entries=args.snapshot_entries, catch_up_entries=args.catch_up_entries,
        max_batch=args.max_batch,
    )
    others = {i: a for i, a in peers.items() if i != args.id}
    shutil.rmtree(data_dir / "incoming", ignore_errors=True)
    transport = RaftTransport(args.id, others, staging_dir=data_dir / "incoming", insecure=args.insecure)
    node = RaftNode(args.id, LmdbRaftStorage(env=sm.env), sm, settings=settings,
                    bootstrap_voters=tuple(sorted(peers)), send=transport.send, on_member_added=transport.add_peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run, node, peers[args.id])
        await nursery.start(node.run)
        limits = BridgeLimits(max_workers=64, max_concurrent_rpcs=256, max_inflight=256, max_call_s=30)
        bound = await nursery.start(
            lambda task_status: serve_grpc(
                [Binding(_add_kv_service, KVService(node, sm, transport))], args.client,
                limits=limits, task_status=task_status,
            )
        )
        if len(peers) == 1:
            node.campaign()
        print(f"raft-kv {args.id} ready raft={peers[args.id]} client={bound}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="raft_kv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--peers", required=True, help="id=host:port for every member, this one included")
    ap.add_argument("--client", required=True, help="host:port of the client RPC")
    ap.add_argument("--insecure", action="store_true", help="plaintext Raft transport (tests only)")
    ap.add_argument("--tick-ms", type=int, default=50)
    ap.add_argument("--election-ticks", type=int, default=10)
    ap.add_argument("--heartbeat-ticks", type=int, default=2)
    ap.add_argument("--snapshot-entries", type=int, default=10_000)
    ap.add_argument("--catch-up-entries", type=int, default=1_000)
    ap.add_argument("--max-batch", type=int, default=1024, help="commands per Ready (1: no batching)")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    if not args.insecure:
        ap.error("only --insecure is wired up in this test server; daemons pass TLS credentials")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s node{args.id} %(name)s %(levelname)s %(message)s")
    trio.run(serve, args)


if __name__ == "__main__":
    main()
