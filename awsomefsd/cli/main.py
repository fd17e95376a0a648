"""Command line: thin wrappers that parse flags into settings and hand over to the services.

Every command takes the same settings (`--config`, `--state`, `--device`, `--mount`, ...) so that
`run`, `fsck` and `status` agree on where a node keeps its state.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from awsomefsd import __version__
from awsomefsd.errors import OperatorError

DEV_DEFAULT_STATE = Path("/var/lib/awsomefs-dev")
DEV_DEFAULT_MOUNT = Path("/mnt/awsomefs")
DEV_DEFAULT_SIZE = "4G"
DEV_CLUSTER_DEFAULT_STATE = Path("/var/lib/awsomefs-dev-cluster")
DEV_CLUSTER_DEFAULT_MOUNT = Path("/mnt/awsomefs-dev-cluster")


def _add_settings_flags(parser: argparse.ArgumentParser, *, device: bool = True, mount: bool = True) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (default /etc/awsomefs/awsomefsd.toml)")
    parser.add_argument("--state", type=Path, help="node-local state directory (metadata)")
    if device:
        parser.add_argument("--device", type=Path, help="shared block device or image file")
    if mount:
        parser.add_argument("--mount", type=Path, help="mount point")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="this node's cluster listener (mTLS; the join listener is on port + 1)")


def _settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("node", "state_dir", getattr(args, "state", None))
    put("device", "path", getattr(args, "device", None))
    put("mount", "path", getattr(args, "mount", None))
    put("log", "level", getattr(args, "log_level", None))
    put("csi", "socket", getattr(args, "csi_socket", None))
    put("cluster", "listen", getattr(args, "listen", None))
    put("cluster", "peers", getattr(args, "peer", None) or None)
    put("cluster", "voters", getattr(args, "voters", None))
    if getattr(args, "metrics_port", None) is not None:
        put("metrics", "port", max(args.metrics_port, 0))
        put("metrics", "enabled", args.metrics_port >= 0)
    return overrides


TAKE_OVER_HELP = ("replace the daemon that runs on this state: load first, then have it hand its mount over (a "
                  "shorter stall than `hand-over` and a new start; needs the fd-keeper)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="awsomefsd",
        description="AwsomeFS node daemon: a cluster filesystem on a shared block device.",
    )
    parser.add_argument("--version", action="version", version=f"awsomefsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    dev = sub.add_parser(
        "dev",
        help="a single node, or with --nodes N a whole cluster, on a sparse image file (development, demos)",
        description="Create (if needed) and format an image file under --state, mount the filesystem at "
        "--mount and serve until Ctrl-C, which unmounts cleanly. With --nodes N (2 or more): N cluster nodes, "
        "each in a network namespace of its own on a private bridge, sharing one image, each with its own "
        "mount (--mount/nodeK), CSI socket, metrics and log; Ctrl-C stops them all and removes the namespaces.",
    )
    dev.add_argument("--nodes", type=int, default=1, help="cluster nodes to run (default 1: a single node)")
    dev.add_argument("--mount", type=Path, help=f"mount point (default {DEV_DEFAULT_MOUNT}; with --nodes: the "
                     f"directory of the nodes' mount points, default {DEV_CLUSTER_DEFAULT_MOUNT})")
    dev.add_argument("--state", type=Path, help=f"state directory (default {DEV_DEFAULT_STATE}, with --nodes "
                     f"{DEV_CLUSTER_DEFAULT_STATE})")
    dev.add_argument("--size", default=DEV_DEFAULT_SIZE, help=f"image size for a new image (default {DEV_DEFAULT_SIZE})")
    dev.add_argument("--csi-socket", type=Path, help="serve the CSI endpoint on this unix socket")
    dev.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port, -1: off; default 9337)")
    dev.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    dev.add_argument("--config", type=Path, help="TOML settings file for [tier], [site] and the rest (none read by "
                     "default); --state, --mount and the image under --state win over its paths")
    dev.add_argument("--take-over", action="store_true", help=TAKE_OVER_HELP)

    run = sub.add_parser("run", help="run the node daemon with its configured settings")
    _add_settings_flags(run)
    _add_cluster_flags(run)
    run.add_argument("--csi-socket", type=Path, help="serve the CSI endpoint on this unix socket")
    run.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port, -1: off)")
    run.add_argument("--take-over", action="store_true", help=TAKE_OVER_HELP)

    fmt = sub.add_parser(
        "format",
        help="format a device or image file for a new cluster",
        description="Write a fresh superblock. Refuses a device that carries another cluster's "
        "superblock unless --force is given.",
    )
    fmt.add_argument("device", type=Path, help="block device or image file")
    fmt.add_argument("--force", action="store_true", help="overwrite another cluster's superblock")
    fmt.add_argument("--size", help="create the image file with this size if it does not exist (e.g. 8G)")
    fmt.add_argument("--label", default="", help="a human label stored in the superblock")
    _add_settings_flags(fmt, device=False, mount=False)

    fsck = sub.add_parser(
        "fsck",
        help="check metadata against the device; exit 0 only when clean",
        description="Check the superblock, the namespace and the space map. With --repair, reclaim "
        "leaked extents and remove dangling records. Run it while the daemon is stopped.",
    )
    _add_settings_flags(fsck, mount=False)
    fsck.add_argument("--repair", action="store_true", help="fix what is found")
    fsck.add_argument("--verify-data", action="store_true", help="also read every extent and check its checksums")

    status = sub.add_parser("status", help="show the node, device, space and mounts")
    _add_settings_flags(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    tier = sub.add_parser("tier", help="the object store: `tier status`, `tier evict PATH...`, `tier recall PATH...`")
    tier.add_argument("action", choices=["status", "evict", "recall"])
    tier.add_argument("paths", nargs="*", type=Path, help="files or directories on the mount (evict, recall)")
    tier.add_argument("--json", action="store_true", help="machine-readable output (status)")
    _add_settings_flags(tier, device=False, mount=False)

    init = sub.add_parser(
        "init",
        help="create a cluster on a shared device, mount it and print a join token",
        description="Format the device for a new cluster (refuses one that holds a cluster unless --force), "
        "make the cluster CA and a join token, start a one-member metadata group and mount. Other nodes "
        "join with `awsomefsd join TOKEN`.",
    )
    _add_settings_flags(init)
    _add_cluster_flags(init)
    init.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port, -1: off)")
    init.add_argument("--csi-socket", type=Path, help="serve the CSI endpoint on this unix socket")
    init.add_argument("--size", help="create the device as an image file of this size if it does not exist")
    init.add_argument("--force", action="store_true", help="format a device that holds another cluster")
    init.add_argument("--label", default="", help="a human label stored in the superblock")
    init.add_argument("--voters", type=int, choices=[1, 3, 5], help="voters the cluster aims for (default 3)")

    join = sub.add_parser(
        "join",
        help="join a cluster with its token, then mount",
        description="Find a member by zeroconf (or --peer), check the cluster CA pinned by the token, prove "
        "the token, receive a node certificate, join the metadata group and mount the same file system.",
    )
    join.add_argument("token", help="the join token printed by `awsomefsd init` or `awsomefsd token`")
    _add_settings_flags(join)
    _add_cluster_flags(join)
    join.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port, -1: off)")
    join.add_argument("--csi-socket", type=Path, help="serve the CSI endpoint on this unix socket")
    join.add_argument("--peer", action="append", metavar="HOST:PORT",
                      help="a member's cluster address, when zeroconf multicast is not available (repeatable)")

    token = sub.add_parser("token", help="print this cluster's join token (`token rotate` replaces it; `token new` "
                           "makes the token of a new cluster that forms itself)")
    token.add_argument("action", nargs="?", choices=["rotate", "new"],
                       help="rotate: make a new token, the old one stops working; new: a cluster token for `run` on "
                       "every node ([cluster] token)")
    token.add_argument("--seed", action="append", default=[], metavar="HOST:PORT",
                       help="with `new`: an address members will listen on, carried in the token (repeatable)")
    _add_settings_flags(token, device=False, mount=False)

    node = sub.add_parser("node", help="manage members: `node remove ID` removes a node and revokes its certificate")
    node.add_argument("action", choices=["remove"])
    node.add_argument("node_id", type=int, help="the node id (see `awsomefsd status`)")
    _add_settings_flags(node, device=False, mount=False)

    site = sub.add_parser(
        "site", help="the link to another site: `site link [TOKEN]`, `site unlink`, `site status`, "
        "`site conflicts [resolve ID --keep winner|loser|both]`, `site verify`",
        description="Cross-site replication. `site link` prints a link token on this site; `site link TOKEN` on "
        "the other site pairs the two. `site status` shows the link, the lag each way and the conflicts; "
        "`site conflicts` lists them; `site conflicts resolve ID --keep winner|loser|both` settles one on both "
        "sites; `site verify` compares both sites' trees (exit 0 only when identical).")
    site.add_argument("action", choices=["link", "unlink", "status", "conflicts", "verify"])
    site.add_argument("arguments", nargs="*", metavar="ARG",
                      help="for `link`: the token the other site printed; for `conflicts`: resolve ID")
    site.add_argument("--keep", choices=["winner", "loser", "both"],
                      help="for `conflicts resolve`: which version stays (both: the loser beside the file)")
    site.add_argument("--forget", action="store_true",
                      help="for `unlink`: drop what is kept for linking the same site again (also once unlinked)")
    site.add_argument("--json", action="store_true", help="machine-readable output")
    _add_settings_flags(site, device=False, mount=False)

    sub.add_parser("self-test", help="touch every bundled dependency (checks a compiled binary)")
    hand = sub.add_parser(
        "hand-over",
        help="replace the running daemon without unmounting: it answers what it read, syncs, leaves the mount "
        "to the next start and exits 75 (systemctl reload does this)",
    )
    _add_settings_flags(hand, device=False, mount=False)
    keeper = sub.add_parser(
        "fd-keeper",
        help="keep mounts' /dev/fuse descriptors while their daemons restart (where systemd does not)",
        description="Hold the /dev/fuse descriptors daemons give it, so their mounts survive a restart or an "
        "upgrade of the daemon; a daemon with [mount] fd_keeper set to this socket uses it. Runs until killed.",
    )
    keeper.add_argument("--socket", type=Path, default=Path("/run/awsomefs/fd-keeper.sock"),
                        help="unix socket to serve (default %(default)s)")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["fuse-worker"]:  # started by the daemon, not by users
        from awsomefsd.fuse.kernel.worker_loop import worker_main

        return worker_main((sys.argv[1:] if argv is None else argv)[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "log_level", None) or "info")
    try:
        return _dispatch(args)
    except OperatorError as exc:
        print(f"awsomefsd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    except OSError as exc:  # a path that is not what it should be, a permission: one line, no traceback
        print(f"awsomefsd: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
              file=sys.stderr)
        return 1


def _fd_keeper(socket_path: Path) -> int:
    import signal

    from awsomefsd.fuse.kernel.keeper import serve_keeper

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve_keeper(socket_path, ready=lambda: print(f"awsomefsd: keeping descriptors on {socket_path}", flush=True))
    except OSError as exc:
        raise OperatorError(f"cannot serve {socket_path}: {exc.strerror or exc}") from None
    return 0


def _stdout_closed() -> int:
    """The reader of our output went away (`status --json | head`): no traceback, and none at exit
    either (Python flushes stdout once more then); the status a process killed by SIGPIPE has."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 128 + 13


def _check_paths(args: argparse.Namespace, settings: Any) -> None:
    """A bad path named on the command line is refused with the flag's name, before anything runs."""
    device = getattr(settings, "device", None)
    path = getattr(device, "path", None)
    if path is not None and Path(path).is_dir():
        flag = "" if args.command == "format" else "--device "
        raise OperatorError(f"{flag}{path}: a directory, not a block device or an image file")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "fd-keeper":  # before the daemon's imports: the keeper stays small (its pod's limit)
        return _fd_keeper(args.socket)
    if args.command == "run" or (args.command == "dev" and args.nodes == 1):
        import signal

        # A hand-over asked for before the daemon serves would end it (SIGUSR2's default action)
        # half started; the successor that asks keeps asking (actions.take_over_from).
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if not args.take_over:
            from awsomefsd import priority

            priority.raise_for_start()  # a successor raises it once applications wait for it
    from awsomefsd.cli import actions

    overrides = _settings_overrides(args)
    if args.command == "self-test":
        from awsomefsd.cli.selftest import run_self_test

        return run_self_test()
    if args.command == "dev" and args.nodes != 1:
        from awsomefsd.cli.devcluster.session import run_dev_cluster

        for flag, value in (("--csi-socket", args.csi_socket), ("--metrics-port", args.metrics_port),
                            ("--config", args.config)):
            if value is not None:
                raise OperatorError(f"{flag} does not go with --nodes: each node of a dev cluster has its own")
        return run_dev_cluster(args.nodes, args.state or DEV_CLUSTER_DEFAULT_STATE,
                               args.mount or DEV_CLUSTER_DEFAULT_MOUNT, args.size)
    if args.command == "dev":
        return actions.dev(args.state or DEV_DEFAULT_STATE, args.mount or DEV_DEFAULT_MOUNT, args.size, overrides,
                           config=args.config, take_over=args.take_over)
    settings = actions.settings_from(getattr(args, "config", None), overrides)
    _check_paths(args, settings)
    if args.command == "run":
        from awsomefsd.cli import cluster

        return cluster.run_command(settings, take_over=args.take_over)
    if args.command in ("init", "join", "token", "node"):
        from awsomefsd.cli import cluster

        if args.command == "init":
            return cluster.init(settings, size=args.size, force=args.force, label=args.label)
        if args.command == "join":
            return cluster.join(settings, args.token)
        if args.command == "token":
            if args.action == "new":
                return cluster.token_new(args.seed)
            return cluster.token_rotate(settings) if args.action == "rotate" else cluster.token(settings)
        return cluster.node_remove(settings, args.node_id)
    if args.command == "site":
        from awsomefsd.cli.repl import site_command

        return site_command(settings, args.action, args.arguments, keep=args.keep, as_json=args.json,
                            forget=args.forget)
    if args.command == "hand-over":
        return actions.hand_over(settings)
    if args.command == "format":
        return actions.format_device(settings, args.device, force=args.force, size=args.size, label=args.label)
    if args.command == "fsck":
        return actions.fsck(settings, repair=args.repair, verify_data=args.verify_data)
    if args.command == "status":
        return actions.status(settings, as_json=args.json)
    if args.command == "tier":
        from awsomefsd.cli.tier import tier_move

        if args.action == "status":
            return actions.tier_status(settings, as_json=args.json)
        if not args.paths:
            raise OperatorError(f"tier {args.action} needs the files or directories to move")
        return tier_move(args.paths, args.action)
    raise OperatorError(f"unknown command {args.command}")
