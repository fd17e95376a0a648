"""The cluster's CLI commands: init, join, token, token rotate, node remove, and `run` of a member.

`init`, `join` and `run` take the same settings as a single node (`--device`, `--state`, `--mount`,
`--listen`, the config file), so several members can run side by side on one machine, each in its
own network namespace. What a member needs to restart (cluster id, node id, addresses, device,
mount) is in `<state>/cluster.json`; `awsomefsd run --state DIR` is enough.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from awsomefsd.cli.actions import preflight, state_lock
from awsomefsd.cluster.ca import CertificateError, ClusterCA, make_csr, new_node_key
from awsomefsd.cluster.discovery import browse, find_join_peers
from awsomefsd.cluster.join_service import JoinError, JoinRefused, join_cluster
from awsomefsd.cluster.rpc import control_call
from awsomefsd.cluster.state import MemberState, control_socket, load_token, save_token, tls_dir, token_seeds
from awsomefsd.cluster.tls import NodeCredentials
from awsomefsd.cluster.token import JoinToken, TokenError
from awsomefsd.config import Settings, parse_size_bytes
from awsomefsd.config.addresses import split_host_port
from awsomefsd.errors import OperatorError

if TYPE_CHECKING:
    from awsomefsd.io.claim import DeviceClaim
    from awsomefsd.io.founding import FoundingRecord
    from awsomefsd.io.superblock import Superblock

log = logging.getLogger(__name__)
CLUSTER_AG_COUNT = 64
"""`init` formats with about this many allocation groups (at least 16 MiB each), so that every
member of a cluster gets groups of its own and claims more as it fills them."""
MIN_CLUSTER_AG_BYTES = 16 << 20
CLUSTER_ENTRY_TIMEOUT_S = 1.0
STATUS_CONTROL_S = 15.0  # how long `status` waits for its member's answer (cluster_status)


def _listen(settings: Settings) -> str:
    listen = settings.cluster.listen
    if not listen:
        raise OperatorError("give --listen host:port (or [cluster] listen): where the other members reach this node")
    try:
        _host, port = split_host_port(listen)
    except ValueError as exc:
        raise OperatorError(str(exc)) from None
    if not 1 <= port < 65535:
        raise OperatorError(f"--listen {listen}: port out of range")
    return listen


def _refuse_member(state_dir: Path) -> None:
    """init and join start a new member: never over the state of an existing one."""
    existing = MemberState.load(state_dir)
    if existing is not None:
        raise OperatorError(f"{state_dir} already belongs to node {existing.node_id} of cluster "
                            f"{existing.cluster_id}: start it with `awsomefsd run --state {state_dir}`")


def _device(settings: Settings, size: str | None) -> Path:
    from awsomefsd.io.device import create_image

    path = settings.device.path
    if path is None:
        raise OperatorError("give --device (a shared block device, or an image file with --size to create it)")
    if not path.exists():
        if size is None:
            raise OperatorError(f"{path} does not exist (give --size to create an image file)")
        try:
            create_image(path, parse_size_bytes(size))
        except ValueError as exc:
            raise OperatorError(str(exc)) from None
    return path


def _member_settings(settings: Settings, state: MemberState) -> Settings:
    """Fill in what `cluster.json` remembers and the flags did not say."""
    update: dict[str, Any] = {}
    if settings.device.path is None and state.device:
        update["device"] = settings.device.model_copy(update={"path": Path(state.device)})
    if settings.mount.path is None and state.mount:
        update["mount"] = settings.mount.model_copy(update={"path": Path(state.mount)})
    if not settings.cluster.listen:
        update["cluster"] = settings.cluster.model_copy(update={"listen": state.listen})
    # a cluster device is shared: O_DIRECT on every node, so no node reads its own stale page cache
    update["device"] = update.get("device", settings.device).model_copy(update={"shared": True})
    mount = update.get("mount", settings.mount)
    if settings.mount.coherence == "strict":  # the kernel must ask us every time (docs/coherence.md)
        update["mount"] = mount.model_copy(update={"entry_timeout_s": 0.0, "attr_timeout_s": 0.0,
                                                   "negative_timeout_s": 0.0, "held_entry_timeout_s": 0.0})
    else:
        # Names another node changes cannot be invalidated one by one safely (a kernel entry
        # invalidation waits for the directory's pending requests: a daemon killed meanwhile can
        # never exit), so cached names expire quickly and "no such file" is not cached, except in
        # directories this node holds the delegation of, where no other node changes names: the
        # kernel drops every name when a delegation leaves (docs/coherence.md, mechanism 2).
        update["mount"] = mount.model_copy(update={
            "entry_timeout_s": min(mount.entry_timeout_s, CLUSTER_ENTRY_TIMEOUT_S), "negative_timeout_s": 0.0,
            "held_entry_timeout_s": min(mount.held_entry_timeout_s, mount.entry_timeout_s)})
    return settings.model_copy(update=update)


def cluster_ag_bytes(device_bytes: int) -> int:
    return max(MIN_CLUSTER_AG_BYTES, device_bytes // CLUSTER_AG_COUNT)


def init(settings: Settings, *, size: str | None, force: bool, label: str) -> int:
    from awsomefsd.daemon.formation import founded_record, record_founded
    from awsomefsd.daemon.member import Founding
    from awsomefsd.io.device import BlockDevice
    from awsomefsd.io.errors import DeviceError
    from awsomefsd.io.superblock import format_device

    state_dir = settings.node.state_dir
    with state_lock(state_dir):
        _refuse_member(state_dir)
        listen = _listen(settings)
        preflight(settings, cluster_listen=listen, control=control_socket(state_dir))
        path = _device(settings, size)
        try:
            with BlockDevice.open(path) as device:
                sb = format_device(device, cluster_id=uuid.uuid4(), label=label, force=force,
                                   ag_size_bytes=cluster_ag_bytes(device.size_bytes))
        except (DeviceError, ValueError) as exc:
            raise OperatorError(str(exc)) from None
        state, ca, token = _become_founder(settings, path, sb.cluster_id, listen, JoinToken.generate(
            sb.cluster_id, bytes(32), seeds=token_seeds(listen)))
        print(f"awsomefsd: formatted {path} for new cluster {sb.cluster_id}; this is node 1", flush=True)
        print("awsomefsd: join other nodes with `awsomefsd join TOKEN`; the token:", flush=True)
        print(token.encode(), flush=True)
        record = founded_record(sb, token, owner=sb.cluster_id, listen=listen)
        founding = Founding(ca, token, settings.cluster.voters, on_founded=lambda: record_founded(path, record))
        return _run(_member_settings(settings, state), state, founding=founding)


def _become_founder(settings: Settings, path: Path, cluster_id: uuid.UUID, listen: str, token: JoinToken, *,
                    founding: str = "") -> tuple[MemberState, ClusterCA, JoinToken]:
    """The founder's state files: the cluster CA, node 1's certificate, the join token (its secret,
    now pinning the CA) and cluster.json."""
    state_dir = settings.node.state_dir
    ca = ClusterCA.create(cluster_id)
    key = new_node_key()
    creds = NodeCredentials(key, ca.issue(make_csr(key), 1), ca.cert)
    creds.save(tls_dir(state_dir))
    ca.save(tls_dir(state_dir) / "ca")  # to resume founding after a crash; the same key is in the metadata
    token = token.pinned(ca.fingerprint)
    save_token(state_dir, token.encode())
    mount = settings.mount.path
    state = MemberState(str(cluster_id), 1, listen, founder=True, device=str(path.resolve()),
                        mount=str(mount.resolve()) if mount else "", founding=founding)
    state.save(state_dir)
    return state, ca, token


def join(settings: Settings, token_text: str) -> int:
    from awsomefsd.io.device import BlockDevice
    from awsomefsd.io.errors import DeviceError
    from awsomefsd.io.superblock import read_superblock

    state_dir = settings.node.state_dir
    with state_lock(state_dir):
        _refuse_member(state_dir)
        try:
            token = JoinToken.parse(token_text)
        except TokenError as exc:
            raise OperatorError(f"bad join token: {exc}") from None
        listen = _listen(settings)
        preflight(settings, cluster_listen=listen, control=control_socket(state_dir))
        path = _device(settings, None)
        try:
            with BlockDevice.open(path) as device:
                sb = read_superblock(device).superblock
        except DeviceError as exc:
            raise OperatorError(f"{path}: {exc}") from None
        if sb.cluster_id != token.cluster_id:
            raise OperatorError(f"{path} holds cluster {sb.cluster_id}, but the token is for cluster {token.cluster_id}: "
                                "give the shared device of that cluster")
        if not token.pins_ca:
            raise OperatorError("this is a cluster token for a cluster that forms itself: give it to `awsomefsd run` "
                                "([cluster] token), or join with the token `awsomefsd token` prints on a member")
        peer_map: dict[int, str] = {}
        errors: list[str] = []
        creds = _join_through(settings, token, _find_members(settings, token), listen, peer_map, errors)
        if creds is None:
            raise OperatorError("could not join through any member: " + "; ".join(errors))
        return _run_joined(settings, token, creds, peer_map, path, listen)


def _join_through(settings: Settings, token: JoinToken, peers: list[Any], listen: str, peer_map: dict[int, str],
                  errors: list[str], *, name: str | None = None) -> NodeCredentials | None:
    """Join through the first of `peers` that admits this node; None (and why, in `errors`) when
    none did; OperatorError when the cluster said no."""
    for peer in peers:
        try:
            return join_cluster(token, peer.join_address, name=settings.node.name if name is None else name,
                                listen_address=listen, peers_out=peer_map)
        except JoinRefused as exc:
            raise OperatorError(str(exc)) from None
        except (JoinError, CertificateError) as exc:
            errors.append(f"{peer.join_address}: {exc}")
    return None


def _run_joined(settings: Settings, token: JoinToken, creds: NodeCredentials, peer_map: dict[int, str], path: Path,
                listen: str) -> int:
    state_dir = settings.node.state_dir
    creds.save(tls_dir(state_dir))
    mount = settings.mount.path
    state = MemberState(str(token.cluster_id), creds.identity.node_id, listen, device=str(path.resolve()),
                        mount=str(mount.resolve()) if mount else "")
    state.save(state_dir)
    print(f"awsomefsd: joined cluster {token.cluster_id} as node {state.node_id}", flush=True)
    return _run(_member_settings(settings, state), state, peers=peer_map)


def _find_members(settings: Settings, token: JoinToken) -> list[Any]:
    if settings.cluster.peers:
        try:
            return find_join_peers(token.cluster_id, settings.cluster.peers)
        except ValueError as exc:
            raise OperatorError(str(exc)) from None
    found = browse(token.cluster_id, settings.cluster.discovery_timeout_s).members
    if not found and token.seeds:
        found = find_join_peers(token.cluster_id, token.seeds)
    if not found:
        raise OperatorError(f"no member of cluster {token.cluster_id} answered zeroconf within "
                            f"{settings.cluster.discovery_timeout_s:.0f}s; give --peer host:port of a member")
    return found


def token_new(seeds: list[str]) -> int:
    """`awsomefsd token new`: a formation token for a cluster that forms itself."""
    try:
        token = JoinToken.formation(tuple(seeds))
    except TokenError as exc:
        raise OperatorError(str(exc)) from None
    print(token.encode())
    return 0


def run_command(settings: Settings, *, take_over: bool = False) -> int:
    """`awsomefsd run`: a member restarts from its state; with a cluster token, a node with no
    state founds the cluster or joins it; otherwise a single node. `take_over` (a single node's):
    replace the daemon running on this state (actions.take_over_from)."""
    from awsomefsd import priority
    from awsomefsd.cli import actions
    from awsomefsd.daemon.formation import load_cluster_token

    state = MemberState.load(settings.node.state_dir)
    token = None if state is not None else load_cluster_token(settings)
    if state is not None or token is not None:
        priority.restore(settings.node.serve_nice)  # raised only for a single node's start (awsomefsd/priority.py)
    if state is not None:
        if take_over:
            raise OperatorError("--take-over is for a single node; a cluster member is replaced with `awsomefsd hand-over` "
                                "and a new start")
        return run_member_command(settings, state)
    if token is None:
        return actions.run(settings, take_over=take_over)
    with state_lock(settings.node.state_dir):
        return _form(settings, token)


def _form(settings: Settings, token: JoinToken) -> int:
    """A node with the cluster token and no state: found the cluster, or join it (formation.py)."""
    from awsomefsd.daemon.formation import decide
    from awsomefsd.io.errors import DeviceError

    state_dir = settings.node.state_dir
    _refuse_member(state_dir)
    listen = _listen(settings)
    preflight(settings, cluster_listen=listen, control=control_socket(state_dir))
    path = _device(settings, None)
    me = uuid.uuid4()
    try:
        decision = decide(path, token, state_dir, me=me)
    except DeviceError as exc:
        raise OperatorError(str(exc)) from None
    if decision.founded is not None:
        return _join_formed(settings, token, decision.founded, path, listen)
    assert decision.claim is not None
    return _found_formed(settings, token, decision.claim, decision.superblock, path, listen, me)


def _found_formed(settings: Settings, token: JoinToken, claim: DeviceClaim, sb: Superblock | None, path: Path,
                  listen: str, me: uuid.UUID) -> int:
    from awsomefsd.daemon.formation import format_under_claim, founded_record
    from awsomefsd.daemon.member import Founding
    from awsomefsd.io.errors import DeviceError
    from awsomefsd.io.founding import FoundingRecord, Stage

    try:
        sb = sb or format_under_claim(claim, token, cluster_ag_bytes)
        state, ca, pinned = _become_founder(settings, path, sb.cluster_id, listen, token, founding=str(me))
    except BaseException as exc:
        claim.release(FoundingRecord(Stage.FORMATTED, sb.cluster_id, sb.device_id) if sb is not None else None)
        if isinstance(exc, DeviceError):
            raise OperatorError(str(exc)) from None
        raise
    print(f"awsomefsd: founding cluster {sb.cluster_id} on {path}; this is node 1", flush=True)
    record = founded_record(sb, pinned, owner=me, listen=listen)
    founding = Founding(ca, pinned, settings.cluster.voters, on_founded=lambda: claim.found(record))
    return _run(_member_settings(settings, state), state, founding=founding)


def _join_formed(settings: Settings, token: JoinToken, record: FoundingRecord, path: Path, listen: str) -> int:
    from awsomefsd.daemon.formation import pinned_token, retry_join
    from awsomefsd.daemon.ownership import host_name

    pinned = pinned_token(path, token, record)
    peer_map: dict[int, str] = {}
    errors: list[str] = []
    log.info("cluster %s exists (%s): joining it", token.cluster_id, record.describe())

    def attempt(peers: list[Any]) -> NodeCredentials | None:
        errors.clear()
        return _join_through(settings, pinned, peers, listen, peer_map, errors, name=settings.node.name or host_name())

    creds = retry_join(settings, pinned, record, attempt)
    assert isinstance(creds, NodeCredentials)
    return _run_joined(settings, pinned, creds, peer_map, path, listen)


def run_member_command(settings: Settings, state: MemberState) -> int:
    """`awsomefsd run` of a state directory that belongs to a cluster member."""
    with state_lock(settings.node.state_dir):
        settings = _member_settings(settings, state)
        preflight(settings, cluster_listen=settings.cluster.listen, control=control_socket(settings.node.state_dir))
        if settings.cluster.listen != state.listen:
            state = replace(state, listen=settings.cluster.listen)
            state.save(settings.node.state_dir)
        founding = None
        if state.founder:
            from awsomefsd.daemon.member import Founding

            token_text = load_token(settings.node.state_dir)
            ca_dir = tls_dir(settings.node.state_dir) / "ca"
            if token_text is not None and (ca_dir / "ca.key").exists():
                founding = _resume_founding(settings, state, Founding(
                    ClusterCA.load(ca_dir), JoinToken.parse(token_text), settings.cluster.voters))
                if founding is None:
                    from awsomefsd.daemon.formation import load_cluster_token

                    token = load_cluster_token(settings)
                    if token is None:
                        raise OperatorError("another node founded the cluster while this one was down before it had "
                                            "finished founding; this node's state was moved aside: start it again with the "
                                            "cluster token ([cluster] token) to join")
                    return _form(settings, token)
        return _run(settings, state, founding=founding)


def _resume_founding(settings: Settings, state: MemberState, founding: Any) -> Any:
    """A founder's restart: its Founding, with what still has to be recorded on the device; None
    when another node founded the cluster meanwhile (this node's state is then moved aside)."""
    from awsomefsd.daemon.formation import (
        abandon_state,
        decide,
        founded_record,
        founder_resumes,
        record_founded,
    )
    from awsomefsd.io.device import BlockDevice
    from awsomefsd.io.errors import DeviceError
    from awsomefsd.io.superblock import read_superblock

    state_dir = settings.node.state_dir
    assert settings.device.path is not None
    path = Path(settings.device.path)
    record = founder_resumes(path)
    mine = uuid.UUID(state.founding) if state.founding else None
    if record is not None:
        if mine is not None and record.owner != mine:
            aside = abandon_state(state_dir)
            log.warning("another node founded cluster %s while this one was down mid-founding; its state is in %s",
                        state.cluster_id, aside)
            return None
        return founding
    try:
        with BlockDevice.open(path, shared=True) as device:
            sb = read_superblock(device).superblock
        decision = decide(path, founding.token, state_dir, me=mine) if mine is not None else None
    except DeviceError as exc:
        raise OperatorError(str(exc)) from None
    if decision is None:  # `init`'s founder (or a cluster from before founding records): record it now
        done = founded_record(sb, founding.token, owner=sb.cluster_id, listen=state.listen)
        founding.on_founded = lambda: record_founded(path, done)
        return founding
    if decision.founded is not None:
        abandon_state(state_dir)
        return None
    assert mine is not None and decision.claim is not None
    claim, done = decision.claim, founded_record(sb, founding.token, owner=mine, listen=state.listen)
    founding.on_founded = lambda: claim.found(done)
    return founding


def _serving(mount: str) -> None:
    """A member serves its mount: say so, and keep what it loaded out of later collections."""
    from awsomefsd import priority
    from awsomefsd.daemon.node import print_ready

    print_ready(mount)
    priority.freeze_loaded()


def _run(settings: Settings, state: MemberState, *, founding: Any = None, peers: dict[int, str] | None = None) -> int:
    from awsomefsd.cli.actions import EXIT_HANDED_OVER, daemon_failure, device_errors
    from awsomefsd.daemon.member import open_member, run_member
    from awsomefsd.fuse.mount import MountError

    logging.getLogger().setLevel(settings.log.level.upper())
    creds = NodeCredentials.load(tls_dir(settings.node.state_dir))
    try:
        member = open_member(settings, state, creds, founding=founding is not None, peers=peers)
    except device_errors() as exc:
        raise OperatorError(str(exc)) from None
    try:
        handed_over = trio.run(functools.partial(run_member, member, founding=founding, ready=_serving))
    except MountError as exc:
        raise OperatorError(str(exc)) from None
    except Exception as exc:
        raise OperatorError(daemon_failure(exc)) from None
    finally:
        if member.core is not None:
            member.core.close()
        else:
            member.raft.close()
            member.storage.close()
    if handed_over:
        print("awsomefsd: left the mount to the next daemon", flush=True)
        return EXIT_HANDED_OVER
    print("awsomefsd: unmounted", flush=True)
    return 0


# --- commands that talk to the running daemon --------------------------------------------------------
def _control(settings: Settings, request: dict[str, Any]) -> dict[str, Any]:
    state_dir = settings.node.state_dir
    if MemberState.load(state_dir) is None:
        raise OperatorError(f"{state_dir} is not the state directory of a cluster member (give --state)")
    try:
        reply = control_call(str(control_socket(state_dir)), request)
    except ConnectionError as exc:  # ControlTimeout too: each says what happened in one line
        raise OperatorError(str(exc)) from None
    if "error" in reply:
        raise OperatorError(str(reply["error"]))
    return reply


def token(settings: Settings) -> int:
    state_dir = settings.node.state_dir
    if MemberState.load(state_dir) is None:
        raise OperatorError(f"{state_dir} is not the state directory of a cluster member (give --state)")
    text = load_token(state_dir)
    if text is None:
        raise OperatorError("this node holds no join token (it was printed on another node); "
                            "`awsomefsd token rotate` makes a new one")
    print(text)
    return 0


def token_rotate(settings: Settings) -> int:
    reply = _control(settings, {"op": "rotate"})
    print("awsomefsd: join token rotated; the previous token no longer admits anyone")
    print(reply["token"])
    return 0


def node_remove(settings: Settings, node: int) -> int:
    _control(settings, {"op": "remove", "node": node})
    print(f"awsomefsd: node {node} removed; its certificate is revoked")
    return 0


def cluster_status(settings: Settings) -> dict[str, Any] | None:
    """The running member's view of the cluster, or None when this is no member or it is stopped.
    Raises ConnectionError (its message one line for the operator) when the daemon does not answer
    in STATUS_CONTROL_S: a follower asks the leader for the members' lag (up to STATUS_ASK_S, 3 s)
    before it answers, which left a busy member 2 s of the 5 s this waited before (too little on a
    loaded machine to tell a slow daemon from a dead one)."""
    state_dir = settings.node.state_dir
    if MemberState.load(state_dir) is None or not control_socket(state_dir).exists():
        return None
    reply = control_call(str(control_socket(state_dir)), {"op": "status"}, timeout_s=STATUS_CONTROL_S)
    if "error" in reply:
        raise ConnectionError(f"the daemon refused the status request: {reply['error']}")
    return reply


__all__ = ["cluster_status", "init", "join", "node_remove", "run_member_command", "token",
           "token_rotate"]
