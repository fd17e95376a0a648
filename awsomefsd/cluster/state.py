"""What a cluster member keeps in its state directory besides the metadata.

    <state>/cluster.json   cluster id, node id, listen address (written once joined or initialised)
    <state>/tls/           node.key (0600), node.crt, ca.crt: this node's mTLS identity
    <state>/join-token     the join token text (0600), on nodes that printed or rotated it
    <state>/control.sock   the running daemon's control socket (token rotate, node remove, status)

A state directory with `cluster.json` belongs to a cluster member: `awsomefsd run` restarts it as
one, with the state it has on disk.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from awsomefsd.cluster.ca import write_private
from awsomefsd.config.addresses import split_host_port

CLUSTER_FILE = "cluster.json"
TLS_DIR = "tls"
TOKEN_FILE = "join-token"
CONTROL_SOCKET = "control.sock"
DEFAULT_PORT = 7470


@dataclass(frozen=True)
class MemberState:
    cluster_id: str
    node_id: int
    listen: str
    """host:port of the cluster (mTLS) listener; the join listener is on port + 1."""
    founder: bool = False
    device: str = ""
    """The device and mount point this node was set up with: `awsomefsd run --state DIR` needs no more."""
    mount: str = ""
    founding: str = ""
    """A founder that claimed the device's founding (one-token formation): its claim's id, which the
    device's founding record names once the cluster exists (awsomefsd/daemon/formation.py)."""

    @property
    def cluster_uuid(self) -> uuid.UUID:
        return uuid.UUID(self.cluster_id)

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / (CLUSTER_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / CLUSTER_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> MemberState | None:
        try:
            raw = json.loads((state_dir / CLUSTER_FILE).read_text())
        except FileNotFoundError:
            return None
        return cls(**raw)


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def listens_everywhere(listen: str) -> bool:
    """A wildcard listen address names no host another node could dial."""
    return split_host_port(listen)[0] in WILDCARD_HOSTS


def token_seeds(listen: str) -> tuple[str, ...]:
    """The seeds a join token made on this node carries: its own address, if it is dialable."""
    return () if listens_everywhere(listen) else (listen,)


def save_token(state_dir: Path, token_text: str) -> None:
    write_private(state_dir / TOKEN_FILE, (token_text + "\n").encode())


def load_token(state_dir: Path) -> str | None:
    try:
        return (state_dir / TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def tls_dir(state_dir: Path) -> Path:
    return state_dir / TLS_DIR


def control_socket(state_dir: Path) -> Path:
    return state_dir / CONTROL_SOCKET
