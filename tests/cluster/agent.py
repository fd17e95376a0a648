"""A small process the cluster tests start inside network namespaces (not part of the daemon).

    agent.py advertise  --cluster UUID --instance NAME --port P [--address A]
    agent.py browse     --cluster UUID --timeout S [--min N]
    agent.py serve-join --state DIR --listen HOST:PORT [--advertise]
    agent.py join       --token TOKEN --state DIR [--peer HOST:PORT ...] [--timeout S]

Long-running commands print `ready ...` once usable and run until their stdin closes, so a test
that dies takes its agents with it. Results are one JSON line on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import uuid
from pathlib import Path

import trio

from awsomefsd.cluster.ca import ClusterCA
from awsomefsd.cluster.discovery import JOIN_PORT_OFFSET, Advertisement, browse, find_join_peers
from awsomefsd.cluster.join_service import JoinError, JoinRefused, JoinService, join_cluster
from awsomefsd.cluster.tls import NodeCredentials, join_server_credentials
from awsomefsd.cluster.token import JoinToken, TokenVerifier
from awsomefsd.config.addresses import split_host_port
from awsomefsd.rpc.bridge import serve_grpc


def say(*words: object) -> None:
    print(*words, flush=True)


def wait_for_stdin_eof() -> None:
    sys.stdin.read()


def cmd_advertise(args: argparse.Namespace) -> int:
    addresses = [args.address] if args.address else None
    with Advertisement(uuid.UUID(args.cluster), args.instance, args.port, addresses=addresses) as ad:
        say("ready", ad.name)
        wait_for_stdin_eof()
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    result = browse(uuid.UUID(args.cluster), args.timeout, min_members=args.min)
    say(json.dumps({"members": [[p.host, p.port, p.join_port] for p in result.members], "others": result.others}))
    return 0


async def serve_join(args: argparse.Namespace) -> None:
    state = Path(args.state)
    ca = ClusterCA.load(state / "ca")
    node = NodeCredentials.load(state / "node")
    verifier = TokenVerifier.from_bytes((state / "verifier").read_bytes())
    ids = itertools.count(node.identity.node_id + 1)

    async def assign(_request: object) -> int:
        return next(ids)

    service = JoinService(ca, verifier, assign)
    host, port = split_host_port(args.listen)
    join_listen = f"{host}:{port + JOIN_PORT_OFFSET}"
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: serve_grpc(
                [service.binding()], join_listen, credentials=join_server_credentials(node), task_status=task_status
            )
        )
        if args.advertise:
            ad = Advertisement(ca.cluster_id, f"n{node.identity.node_id}", port, addresses=[host])
            await trio.to_thread.run_sync(ad.__enter__)
        say("ready", bound)
        await trio.to_thread.run_sync(wait_for_stdin_eof, abandon_on_cancel=True)
        if args.advertise:
            await trio.to_thread.run_sync(ad.__exit__, None, None, None)
        nursery.cancel_scope.cancel()


def cmd_join(args: argparse.Namespace) -> int:
    token = JoinToken.parse(args.token)
    peers = find_join_peers(token.cluster_id, [*args.peer, *token.seeds], timeout_s=args.timeout)
    if not peers:
        say(json.dumps({"error": "no member found"}))
        return 2
    try:
        creds = join_cluster(token, peers[0].join_address, timeout_s=args.timeout)
    except JoinRefused as exc:
        say(json.dumps({"refused": str(exc)}))
        return 3
    except JoinError as exc:
        say(json.dumps({"error": str(exc)}))
        return 2
    creds.save(Path(args.state))
    say(json.dumps({"node_id": creds.identity.node_id, "via": peers[0].join_address}))
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("advertise")
    p.add_argument("--cluster", required=True)
    p.add_argument("--instance", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--address")
    p = sub.add_parser("browse")
    p.add_argument("--cluster", required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--min", type=int, default=1)
    p = sub.add_parser("serve-join")
    p.add_argument("--state", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--advertise", action="store_true")
    p = sub.add_parser("join")
    p.add_argument("--token", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--peer", action="append", default=[])
    p.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.cmd == "advertise":
        return cmd_advertise(args)
    if args.cmd == "browse":
        return cmd_browse(args)
    if args.cmd == "serve-join":
        trio.run(serve_join, args)
        return 0
    return cmd_join(args)


if __name__ == "__main__":
    sys.exit(main())
