"""Private networks of network namespaces (DESIGN §10) for dev clusters and tests: nothing sent on
one leaves the machine, and nothing outside can reach in.

Layout of one `PrivateNetwork` with n nodes:

    namespace <base>-br:   br0 (a bridge, multicast snooping off) with ports v1..vn
    namespace <base>-nK:   lo, eth0 = 10.77.0.(K+1)/24 (the other end of vK), 224.0.0.0/4 via eth0

The root namespace gets no interface, address or route of the test network, and the node namespaces
have no default route, so test traffic can neither leave nor come in. Multicast (zeroconf) floods
across the bridge. Names are `<prefix><pid>.<seq>-...` (prefix `awt` for tests, `awd` for `awsomefsd
dev`): a network left behind by a crashed run (its pid is gone) is removed the next time a network is
created. Processes are started with
`nsenter --net=/run/netns/NAME` rather than `ip netns exec`, which would also give them a mount
namespace of their own (a FUSE mount made inside would be invisible to the test).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

TEST_PREFIX = "awt"
DEV_PREFIX = "awd"
SUBNET = "10.77.0"
PREFIX_LEN = 24
MAX_NODES = 200
COMMAND_TIMEOUT_S = 20.0
STOP_DEADLINE_S = 10.0
_NAME_RE = re.compile(rf"^(?:{TEST_PREFIX}|{DEV_PREFIX})(\d+)\.\d+-")
_seq = itertools.count(1)


class NetnsUnavailable(RuntimeError):
    """This machine (or user) cannot make network namespaces (tests skip, `awsomefsd dev` says why)."""


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS` and fail loudly with its stderr."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def existing() -> list[str]:
    """Names of all network namespaces (first word of each `ip netns list` line)."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete our namespaces whose creating process is gone (a crashed or killed run)."""
    removed = []
    for name in existing():
        m = _NAME_RE.match(name)
        if m is not None and not _pid_alive(int(m.group(1))):
            ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Namespace:
    """One node's namespace: its name and address, and how to run things inside it."""

    name: str
    address: str
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("timeout", COMMAND_TIMEOUT_S)
        return subprocess.run(self.command(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside; the network stops it (if still running) when it is torn down."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self.processes.append(proc)
        return proc

    def stop_processes(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(STOP_DEADLINE_S)
        self.processes.clear()


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class PrivateNetwork:
    """A bridge namespace and `n_nodes` node namespaces; a context manager that always cleans up."""

    def __init__(self, n_nodes: int, *, prefix: str = TEST_PREFIX) -> None:
        assert 1 <= n_nodes <= MAX_NODES, n_nodes
        assert prefix in (TEST_PREFIX, DEV_PREFIX), prefix
        self.base = f"{prefix}{os.getpid()}.{next(_seq)}"
        self.bridge = f"{self.base}-br"
        self.nodes = [Namespace(f"{self.base}-n{k}", f"{SUBNET}.{k + 1}") for k in range(1, n_nodes + 1)]

    def __enter__(self) -> PrivateNetwork:
        reason = available()
        if reason is not None:
            raise NetnsUnavailable(reason)
        remove_leftovers()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _create(self) -> None:
        br = self.bridge
        ip("netns", "add", br)
        ip("-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", br, "link", "set", "br0", "up")
        for k, node in enumerate(self.nodes, start=1):
            ip("netns", "add", node.name)
            ip("-n", br, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", node.name)
            ip("-n", br, "link", "set", f"v{k}", "master", "br0")
            ip("-n", br, "link", "set", f"v{k}", "up")
            ip("-n", node.name, "link", "set", "lo", "up")
            ip("-n", node.name, "addr", "add", f"{node.address}/{PREFIX_LEN}", "dev", "eth0")
            ip("-n", node.name, "link", "set", "eth0", "up")
            ip("-n", node.name, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def close(self) -> None:
        """Stop processes started inside, then delete every namespace of this network (idempotent)."""
        for node in self.nodes:
            node.stop_processes()
        names = set(existing())
        for name in [n.name for n in self.nodes] + [self.bridge]:
            if name in names:
                ip("netns", "del", name, check=False)

    def set_link(self, node: Namespace, up: bool) -> None:
        """Cut or restore one node's cable (a partition), on the bridge side."""
        k = self.nodes.index(node) + 1
        ip("-n", self.bridge, "link", "set", f"v{k}", "up" if up else "down")
