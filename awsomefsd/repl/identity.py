"""A site's TLS identity for the link to another site: a CA and a certificate issued by it.

The other site pins this CA (its fingerprint is in the link token; the CA certificate itself is
exchanged when pairing) and accepts only certificates that chain to it, in both directions of the
link. A cluster member would use its cluster's CA; a single node has none, so the first time it
needs one it makes a CA for its site (the filesystem's cluster id) and a certificate for itself,
kept in `<state>/site/` (keys mode 0600).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from awsomefsd.cluster.ca import ClusterCA, fingerprint, make_csr, new_node_key
from awsomefsd.cluster.tls import NodeCredentials

SITE_DIR = "site"
SITE_NODE_ID = 1
"""A single-node site's certificate names node 1 of its site."""


def site_dir(state_dir: Path) -> Path:
    return state_dir / SITE_DIR


def load_or_create(state_dir: Path, site: uuid.UUID) -> NodeCredentials:
    """This node's site credentials, made on first use."""
    directory = site_dir(state_dir)
    if (directory / "node.crt").exists():
        credentials = NodeCredentials.load(directory)
        if credentials.cluster_id != site:
            raise ValueError(f"{directory} holds the credentials of site {credentials.cluster_id}, not {site}")
        return credentials
    ca = ClusterCA.create(site)
    key = new_node_key()
    credentials = NodeCredentials(key, ca.issue(make_csr(key), SITE_NODE_ID), ca.cert)
    ca.save(directory)
    credentials.save(directory)
    return credentials


def ca_fingerprint(credentials: NodeCredentials) -> bytes:
    return fingerprint(credentials.ca_cert)
