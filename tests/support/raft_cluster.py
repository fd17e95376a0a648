"""Real-process Raft clusters for tests and benchmarks: `raft_kv` servers on loopback addresses.

Each member is `python -m tests.support.raft_kv` in its own process with its own data
directory; the Raft transport listens on 127.0.0.<id+1> and the client RPC on 127.0.0.1. Waiting is
always on a condition with a deadline (`wait_for`), never a bare sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from tests.support.ports import free_port
from tests.support.raft_kv import KV_SERVICE

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]  # the checkout, so children import this tree


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, interval_s: float = 0.02) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (grpc.RpcError, OSError, KeyError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last_error})")
        time.sleep(interval_s)


class Member:
    def __init__(self, node_id: int, data_dir: Path, raft_addr: str, client_addr: str) -> None:
        self.id = node_id
        self.data_dir = data_dir
        self.raft_addr = raft_addr
        self.client_addr = client_addr
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel = grpc.insecure_channel(client_addr)
        self._calls = {
            name: self.channel.unary_unary(f"/{KV_SERVICE}/{name}") for name in ("Put", "Get", "Status", "Bench")
        }

    def call(self, method: str, timeout_s: float = 5.0, **body: Any) -> dict[str, Any]:
        reply = self._calls[method](json.dumps(body).encode(), timeout=timeout_s)
        return dict(json.loads(reply))

    def status(self) -> dict[str, Any]:
        return self.call("Status", timeout_s=1.0)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class KVCluster:
    """N members; `start()` launches them all, `kill`/`stop`/`cont`/`restart` act on one."""

    def __init__(self, root: Path, n: int, *, snapshot_entries: int = 10_000, catch_up_entries: int = 1_000,
                 tick_ms: int = 50, election_ticks: int = 10, max_batch: int = 1024) -> None:
        self.root = root
        self.tick_ms = tick_ms
        self.election_ticks = election_ticks
        self.extra = [
            "--snapshot-entries", str(snapshot_entries), "--catch-up-entries", str(catch_up_entries),
            "--tick-ms", str(tick_ms), "--election-ticks", str(election_ticks), "--max-batch", str(max_batch),
        ]
        self.members: dict[int, Member] = {}
        for i in range(1, n + 1):
            host = f"127.0.0.{i + 1}"
            self.members[i] = Member(
                i, root / f"node{i}", f"{host}:{free_port(host)}", f"127.0.0.1:{free_port('127.0.0.1')}"
            )
        self.peers = ",".join(f"{m.id}={m.raft_addr}" for m in self.members.values())

    @property
    def election_timeout_s(self) -> float:
        """The longest randomized election timeout: 2 * election_ticks ticks."""
        return 2 * self.election_ticks * self.tick_ms / 1000

    def launch(self, node_id: int) -> None:
        m = self.members[node_id]
        m.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(m.data_dir / "server.log", "ab")  # noqa: SIM115 - owned by the child
        m.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.raft_kv", "--id", str(m.id), "--data-dir", str(m.data_dir),
             "--peers", self.peers, "--client", m.client_addr, "--insecure", *self.extra],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def start(self, timeout_s: float = 30.0) -> None:
        for i in self.members:
            self.launch(i)
        for m in self.members.values():
            self.wait_serving(m.id, timeout_s)

    def wait_serving(self, node_id: int, timeout_s: float = 30.0) -> None:
        m = self.members[node_id]

        def serving() -> dict[str, Any]:
            assert m.alive, f"node {m.id} exited:\n{self.logs()}"
            return m.status()

        wait_for(f"node {m.id} to serve", serving, timeout_s)

    def leader(self, timeout_s: float = 10.0, exclude: set[int] = frozenset()) -> Member:  # type: ignore[assignment]
        """The member every live member agrees leads, waited for."""

        def agreed() -> Member | None:
            leads = set()
            for m in self.members.values():
                if m.alive and m.id not in exclude:
                    st = m.status()
                    leads.add((st["leader"], st["term"]))
            if len(leads) == 1:
                lead, _ = leads.pop()
                if lead and lead not in exclude and self.members[lead].status()["role"] == "leader":
                    return self.members[lead]
            return None

        return wait_for("one leader all live members agree on", agreed, timeout_s)

    def kill(self, node_id: int) -> None:
        m = self.members[node_id]
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(timeout=10)

    def stop(self, node_id: int) -> None:
        proc = self.members[node_id].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)

    def cont(self, node_id: int) -> None:
        proc = self.members[node_id].proc
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        for m in self.members.values():
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGCONT)
                m.proc.send_signal(signal.SIGKILL)
                m.proc.wait(timeout=10)
            m.channel.close()

    def logs(self) -> str:
        out = []
        for m in self.members.values():
            path = m.data_dir / "server.log"
            if path.exists():
                out.append(f"--- node {m.id} ---\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(out)
