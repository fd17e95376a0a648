"""The cluster the tests run: awsomefsd's own dev cluster (awsomefsd/cli/devcluster/members.py), with
lease timings shortened through the environment (AWSOMEFS_CLUSTER__*) so fencing tests take seconds
(everything else is the daemon's default), started with this interpreter from this checkout.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from awsomefsd.cli.devcluster import members
from awsomefsd.cli.devcluster.members import PORT, DevCluster, DevNode, detach
from awsomefsd.cli.devcluster.network import PrivateNetwork
from tests.support.daemon import AWSOMEFSD, REPO

FAST_LEASES = {"AWSOMEFS_CLUSTER__LEASE_S": "3", "AWSOMEFS_CLUSTER__RENEW_S": "0.5", "AWSOMEFS_CLUSTER__STALL_S": "8",
               "AWSOMEFS_CLUSTER__LEASE_MARGIN_S": "1"}

Cluster = DevCluster
Node = DevNode
__all__ = ["FAST_LEASES", "PORT", "Cluster", "Node", "cluster_in", "daemon_environment", "detach"]


def daemon_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What every test daemon runs with: this checkout importable, short leases, then `extra`."""
    return {**os.environ, "PYTHONPATH": str(REPO), **FAST_LEASES, **(extra or {})}


def cluster_in(network: PrivateNetwork, root: Path, *, env: dict[str, str] | None = None,
               **kwargs: Any) -> AbstractContextManager[DevCluster]:
    """A test cluster on `network` under `root`, always closed (mounts detached, daemons killed)."""
    return members.cluster_in(network, root, command=AWSOMEFSD, env=daemon_environment(env), **kwargs)
