"""A cluster that forms itself: the same `awsomefsd run` and one token on every node (design note 53).

`awsomefsd token new` makes a formation token once: a new cluster id and a secret, no CA yet. Every
node starts with it (a Kubernetes Secret, /etc/awsomefs) and an empty state directory. The device
they all share decides who founds: the node that wins the claim of the device's founding
(awsomefsd/io/claim.py) formats it if it is blank, makes the CA and the cluster's first state, and
writes the FOUNDED record naming where it listens, the CA's fingerprint and a proof that binds that
fingerprint to the token's secret. Every other node waits for that record, checks the proof, pins
the CA from it and joins, retrying until the founder's join listener answers. A node that lost its
state directory finds the record and joins again; the cluster replaces its old member of the same
name (daemon/member.py, `Member._replace_namesake`).

A founder that stops before recording the cluster claims again under its old claim id when it
restarts; if meanwhile another node took over the abandoned claim and founded, this one's state is
moved aside (it never served anything) and it joins that cluster instead.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from awsomefsd.cluster.ca import fingerprint
from awsomefsd.cluster.discovery import Peer, browse
from awsomefsd.cluster.token import JoinToken, TokenError
from awsomefsd.config import Settings
from awsomefsd.daemon.ownership import founded_cluster, host_name, legacy_refusal
from awsomefsd.errors import OperatorError
from awsomefsd.io.claim import DeviceClaim, claim_founding
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.errors import DeviceError, NotFormattedError
from awsomefsd.io.founding import NIL, FoundingRecord, Mode, Stage, read_founding, write_founding
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.io.superblock import Superblock, format_device, read_superblock

log = logging.getLogger(__name__)
CLAIM_DEADLINE_S = 300.0
JOIN_DEADLINE_S = 300.0
JOIN_RETRY_S = 1.0


def load_cluster_token(settings: Settings) -> JoinToken | None:
    """The cluster token of `[cluster] token` or `token_file`; None when neither is set."""
    text = settings.cluster.token.strip()
    if not text and settings.cluster.token_file is not None:
        try:
            text = settings.cluster.token_file.read_text().strip()
        except OSError as exc:
            raise OperatorError(f"[cluster] token_file {settings.cluster.token_file}: {exc.strerror or exc}") from None
        if not text:
            raise OperatorError(f"[cluster] token_file {settings.cluster.token_file} is empty")
    if not text:
        return None
    try:
        return JoinToken.parse(text)
    except TokenError as exc:
        raise OperatorError(f"bad cluster token ([cluster] token): {exc}") from None


def peer_addresses(seeds: list[str] | tuple[str, ...]) -> list[str]:
    """Each `host:port`, with a name that resolves to several addresses (a headless Service) given
    as all of them; names that do not resolve (yet) are skipped."""
    from awsomefsd.config.addresses import join_host_port, split_host_port

    found: list[str] = []
    for seed in seeds:
        try:
            host, port = split_host_port(seed)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (ValueError, OSError) as exc:
            log.debug("peer %s does not resolve: %s", seed, exc)
            continue
        for info in infos:
            address = join_host_port(str(info[4][0]), port)
            if address not in found:
                found.append(address)
    return found


@dataclass(frozen=True)
class Decision:
    """What the device says a node with the token and no state should do: found (a claim, and the
    superblock unless the device is blank) or join (the FOUNDED record)."""

    claim: DeviceClaim | None = None
    superblock: Superblock | None = None
    founded: FoundingRecord | None = None


def decide(path: Path, token: JoinToken, state_dir: Path, *, me: uuid.UUID, deadline_s: float = CLAIM_DEADLINE_S,
           ) -> Decision:
    """Found (a claim, and the superblock when the device is formatted) or join (the FOUNDED record)."""
    with BlockDevice.open(path, shared=True) as device:
        sb = _superblock_or_blank(device, path)
        if sb is not None and sb.cluster_id != token.cluster_id:
            raise OperatorError(f"{path} holds cluster {sb.cluster_id}, but the cluster token is for cluster "
                                f"{token.cluster_id}: give this cluster's shared device, or its token")
        record = read_founding(device)
    if record is not None and record.cluster_id != token.cluster_id:
        raise OperatorError(f"{path}'s founding record names cluster {record.cluster_id}, not the token's {token.cluster_id}")
    if record is not None and record.founded:
        return _to_join(path, record)
    if sb is not None and record is None:
        raise OperatorError(legacy_refusal(path, state_dir))
    base = FoundingRecord(Stage.FORMATTED, token.cluster_id, sb.device_id if sb is not None else NIL,
                          host=host_name()[:255], state_dir=str(state_dir)[:1024])
    outcome = claim_founding(path, shared=True, base=base, deadline_s=deadline_s, me=me,
                             on_wait=lambda other: log.info("%s: node %s is founding the cluster; waiting", path,
                                                            other.host or "?"))
    if isinstance(outcome, FoundingRecord):
        return _to_join(path, outcome)
    return Decision(claim=outcome, superblock=sb)


def _to_join(path: Path, record: FoundingRecord) -> Decision:
    if record.mode != Mode.CLUSTER:
        raise OperatorError(f"{path} holds a single node's file system ({record.describe()}): it cannot be joined")
    return Decision(founded=record)


def _superblock_or_blank(device: BlockDevice, path: Path) -> Superblock | None:
    """The superblock; None for a blank device (both superblock slots all zero), which the
    founder formats; anything else that is not a file system is refused."""
    try:
        return read_superblock(device).superblock
    except NotFormattedError:
        blank = not any(device.read(0, BLOCK_SIZE)) and not any(device.read(device.size_bytes - BLOCK_SIZE, BLOCK_SIZE))
        if blank:
            return None
        raise OperatorError(f"{path} holds data that is not an AwsomeFS file system: refusing to format it; if it is "
                            f"expendable, format it with `awsomefsd format {path}` first") from None


def format_under_claim(claim: DeviceClaim, token: JoinToken, ag_size_bytes: Callable[[int], int]) -> Superblock:
    """The founder formats a blank device for the token's cluster (the claim keeps the record)."""
    device = claim.device
    sb = format_device(device, cluster_id=token.cluster_id, label="", ag_size_bytes=ag_size_bytes(device.size_bytes),
                       under_claim=True)
    log.info("formatted %s for cluster %s", device.path, token.cluster_id)
    return sb


def founded_record(sb: Superblock, token: JoinToken, *, owner: uuid.UUID, listen: str) -> FoundingRecord:
    """FOUNDED for a cluster: where it listens, its CA and the proof that the token made it."""
    return founded_cluster(sb, owner=owner, seeds=(listen,), ca_fingerprint=token.ca_fingerprint,
                           proof=token.record_proof(token.ca_fingerprint))


def record_founded(path: Path, record: FoundingRecord) -> None:
    """Write the FOUNDED record without a claim (`awsomefsd init`, which formatted the device)."""
    with BlockDevice.open(path, shared=True) as device:
        write_founding(device, record)


def pinned_token(path: Path, token: JoinToken, record: FoundingRecord) -> JoinToken:
    """The token with the CA the founding record names, once its proof checks out."""
    if token.pins_ca:
        return token
    if record.proof != token.record_proof(record.ca_fingerprint):
        raise OperatorError(f"{path}'s founding record was not written with this cluster token (another token of the "
                            "same cluster id?): join with a token from `awsomefsd token` on a member")
    return token.pinned(record.ca_fingerprint)


def join_candidates(settings: Settings, token: JoinToken, record: FoundingRecord, *, browse_s: float) -> list[Peer]:
    """Where to join: the configured peers, the record's addresses (where the founder listened),
    the token's seeds, then members advertised by zeroconf (the founder may be gone, or moved)."""
    seeds = [*peer_addresses(settings.cluster.peers), *record.seeds, *token.seeds]
    peers = [Peer.from_seed(seed) for seed in dict.fromkeys(seeds)]
    if browse_s > 0:
        known = {peer.join_address for peer in peers}
        peers += [peer for peer in browse(token.cluster_id, browse_s).members if peer.join_address not in known]
    return peers


def retry_join(settings: Settings, token: JoinToken, record: FoundingRecord,
               attempt: Callable[[list[Peer]], object | None], deadline_s: float = JOIN_DEADLINE_S) -> object:
    """Ask `attempt` to join through the candidates until it succeeds (the founder's join listener
    may not answer yet); OperatorError with every address's answer at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        browse_s = min(settings.cluster.discovery_timeout_s, 2.0) if settings.cluster.advertise else 0.0
        peers = join_candidates(settings, token, record, browse_s=browse_s)
        done = attempt(peers)
        if done is not None:
            return done
        if time.monotonic() > deadline:
            raise OperatorError(f"no member of cluster {token.cluster_id} admitted this node within {deadline_s:.0f}s "
                                f"(tried {', '.join(p.join_address for p in peers) or 'zeroconf'})")
        time.sleep(JOIN_RETRY_S)


def ca_fingerprint_of(cert_pem: bytes) -> bytes:
    from cryptography import x509

    return fingerprint(x509.load_pem_x509_certificate(cert_pem))


def abandon_state(state_dir: Path) -> Path:
    """Move a founder's state aside (it never served: another node founded the cluster meanwhile)."""
    aside = state_dir / f"abandoned-{time.time_ns()}"
    aside.mkdir()
    for entry in state_dir.iterdir():
        if entry.name != "daemon.lock" and not entry.name.startswith("abandoned-"):
            entry.rename(aside / entry.name)
    return aside


def founder_resumes(path: Path) -> FoundingRecord | None:
    """A founder's record on restart: FOUNDED (by it or another), or None when founding is unfinished."""
    try:
        with BlockDevice.open(path, shared=True) as device:
            record = read_founding(device)
    except DeviceError as exc:
        raise OperatorError(str(exc)) from None
    if record is not None and record.founded:
        return record
    return None


__all__ = [
    "Decision",
    "abandon_state",
    "decide",
    "format_under_claim",
    "founded_record",
    "founder_resumes",
    "load_cluster_token",
    "peer_addresses",
    "pinned_token",
    "record_founded",
    "retry_join",
]
