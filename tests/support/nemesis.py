"""A Jepsen-style nemesis for a real cluster (tests/support/cluster.py), and the checks of what the
clients saw (tests/support/nemesis_client.py). Used by tests/cluster/test_nemesis.py.

The nemesis (this test process) injects one fault at a time, chosen with a seeded random generator:
- `kill`: SIGKILL a node (the leader or a follower), then start it again with `awsomefsd run`;
- `pause`: SIGSTOP a node until the others have expired its lease, then SIGCONT;
- `partition`: cut a node's link until the others have expired it, then heal;
- `restart`: stop a node's daemon cleanly (SIGINT), then start it again.
After each fault it waits until the cluster is healthy again (every daemon running and mounted,
one leader, every lease valid and no member expired), then leaves a quiet window.

It never opens a file on a mount (clients run in their own processes, see nemesis_client.py), so
it may fork (`ip`, `nsenter`) while a node is stopped. It asks the daemons through their control
sockets (gRPC on a unix socket: no fork, bounded time).

A daemon that exits without being told to is a violation (bug 1 of issue 11): its last log lines
are kept and it is started again, so one run finds more than one thing.

The checks (`check_run`):
- results: each operation's result is one POSIX allows (never EEXIST for O_CREAT without O_EXCL);
  errors a fault explains (EIO, ENOTCONN, ...) are allowed only for operations that overlapped a
  fault; nothing hangs;
- linearizability of the namespace registers (tests/support/linearizability.py, one key at a
  time); outcomes a client could not learn count as "may have happened";
- the logs: every acknowledged (fsynced) record present, whole, once, and in its writer's order,
  the same bytes on every node;
- progress: in every quiet window every client completes operations and every writer gets its
  appends through; no operation there takes longer than `SLOW_OP_S`;
- fsck of every member is clean (run by the test after a clean stop).
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awsomefsd.cluster.rpc import control_call
from awsomefsd.cluster.state import control_socket
from tests.support.cluster import Cluster, Node
from tests.support.linearizability import UNKNOWN, CheckBudgetExceeded, Operation, check_single
from tests.support.nemesis_client import SHARED_LOGS, parse_record

KINDS = ("kill", "pause", "partition", "restart")
FAULT_ERRNOS = {"EIO", "ENOTCONN", "ECONNABORTED", "ESTALE", "EINTR", "ETIMEDOUT"}
ALLOWED = {"create_excl": {"ok", "EEXIST"}, "create": {"ok"}, "put": {"ok"}, "get": {"=", "ENOENT"},
           "unlink": {"ok", "ENOENT"}, "append": {"ok"}}
GRACE_S = 1.0
"""After the cluster is healthy again, operations started this much later must not fail."""
SLOW_OP_S = 6.0
"""No operation fully inside a quiet window may take longer (a starved writer, a stalled node)."""
FAIR_SHARE = 3
"""No nonstop appender gets less than a third of the busiest one's appends to the contended log."""
HEALTHY_DEADLINE_S = 120.0
EXPIRE_DEADLINE_S = 45.0
CONTROL_S = 3.0
LIN_MAX_STEPS = 500_000


@dataclass
class Fault:
    kind: str
    node: int  # node index (1-based, as in tests.support.cluster)
    role: str  # "leader" or "follower" when the fault began
    start: float
    end: float = 0.0  # healed: SIGCONT, link up, or restarted and mounted
    healthy: float = 0.0  # the whole cluster healthy again


@dataclass
class Run:
    """What happened, for the checks and the summary."""

    seed: int
    faults: list[Fault] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)  # quiet: (healthy, next fault)
    down: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    cut_off: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    violations: list[str] = field(default_factory=list)
    unplanned_exits: int = 0
    notes: list[str] = field(default_factory=list)

    def violation(self, text: str) -> None:
        self.violations.append(text)
        print(f"VIOLATION: {text}", flush=True)


def status(node: Node, *, timeout_s: float = CONTROL_S) -> dict[str, Any] | None:
    """The node's own view (no question to the leader), or None when it does not answer."""
    try:
        return control_call(str(control_socket(node.state)), {"op": "status", "lag": False}, timeout_s=timeout_s)
    except (ConnectionError, ValueError, OSError):
        return None


def alive(node: Node) -> bool:
    return node.proc is not None and node.proc.poll() is None


class Nemesis:
    def __init__(self, cluster: Cluster, nodes: list[Node], run: Run, *, on_event: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.run = run
        self.rng = random.Random(run.seed)
        self.told: set[int] = set()  # nodes stopped on purpose (no violation when they exit)
        self.seen_alive: dict[int, float] = {}  # when each daemon was last seen running
        self.say = on_event
        self.t0 = time.monotonic()

    # --- watching --------------------------------------------------------------------------------
    def watch(self) -> None:
        """A daemon that exited without being told to: a violation; start it again."""
        for node in self.nodes:
            if node.index in self.told or node.proc is None:
                continue
            if node.proc.poll() is None:
                self.seen_alive[node.index] = time.monotonic()
                continue
            code = node.proc.returncode
            tail = node.logs(40)
            self.run.unplanned_exits += 1
            self.run.violation(f"node {node.index} exited without being told to (exit status {code}) "
                               f"{self.ago()}; its last log lines:\n{tail}")
            down_at = self.seen_alive.get(node.index, self.t0)  # it died after it was last seen running
            self.told.add(node.index)
            try:
                node.kill()  # detach its mount
                node.start("run")
            except Exception as exc:
                self.run.violation(f"node {node.index} could not be started again after exiting: {exc}")
                raise
            finally:
                self.told.discard(node.index)
            self.run.down[node.index].append((down_at, time.monotonic()))

    def ago(self) -> str:
        return f"at +{time.monotonic() - self.t0:.1f}s"

    def sleep(self, seconds: float) -> None:
        """Let a fault or a quiet window last `seconds` (the nemesis's choice), watching the daemons."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.watch()
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.watch()
            if time.monotonic() > deadline:
                self.run.violation(f"{what}: not within {timeout_s:.0f}s {self.ago()}")
                return False
            time.sleep(0.1)
        return True

    # --- the cluster's state ---------------------------------------------------------------------
    def leader(self, among: list[Node] | None = None) -> Node | None:
        for node in among or self.nodes:
            st = status(node) if alive(node) else None
            lead = (st or {}).get("raft", {}).get("leader", 0)
            found = next((n for n in self.nodes if n.node_id == lead), None)
            if found is not None:
                return found
        return None

    def expired_in(self, observers: list[Node], victim: Node) -> bool:
        for node in observers:
            st = status(node)
            me = next((n for n in (st or {}).get("nodes", []) if n["id"] == victim.node_id), None)
            if me is not None and me["expired"]:
                return True
        return False

    def healthy(self) -> bool:
        """Every daemon running and mounted, one leader everyone agrees on, every lease valid."""
        leaders = set()
        for node in self.nodes:
            if not alive(node) or node.index in self.told:
                return False
            st = status(node)
            if st is None or not (st.get("lease") or {}).get("fence_open"):
                return False
            leaders.add(st["raft"]["leader"])
            if any(n["expired"] for n in st["nodes"]):
                return False
        return len(leaders) == 1 and 0 not in leaders

    def wait_healthy(self, what: str) -> float:
        self.wait(self.healthy, HEALTHY_DEADLINE_S, f"the cluster healthy again after {what}")
        return time.monotonic()

    # --- faults ----------------------------------------------------------------------------------
    def pick(self) -> tuple[Node, str]:
        leader = self.leader()
        if leader is not None and self.rng.random() < 0.4:
            return leader, "leader"
        followers = [n for n in self.nodes if n is not leader]
        return self.rng.choice(followers), "follower"

    def inject(self, kind: str) -> Fault:
        victim, role = self.pick()
        others = [n for n in self.nodes if n is not victim]
        fault = Fault(kind, victim.index, role, time.monotonic())
        self.say(f"nemesis {self.ago()}: {kind} node {victim.index} ({role})")
        if kind == "kill":
            self.told.add(victim.index)
            victim.kill()
            self.sleep(self.rng.uniform(0.5, 3.0))
            self._start_again(victim)
            self.told.discard(victim.index)
            fault.end = time.monotonic()
            self.run.down[victim.index].append((fault.start, fault.end))
        elif kind == "restart":
            self.told.add(victim.index)
            assert victim.proc is not None
            victim.signal(signal.SIGINT)
            try:
                code = victim.proc.wait(60)
            except Exception:
                self.run.violation(f"node {victim.index} did not stop within 60s of SIGINT; killing it")
                victim.kill()
                code = 0
            if code != 0:
                self.run.violation(f"node {victim.index} stopped with exit status {code} on SIGINT; its last "
                                   f"log lines:\n{victim.logs(30)}")
            victim.stop()  # waits for the unmount (returns at once: it exited)
            self._start_again(victim)
            self.told.discard(victim.index)
            fault.end = time.monotonic()
            self.run.down[victim.index].append((fault.start, fault.end))
        elif kind == "pause":
            victim.signal(signal.SIGSTOP)
            try:
                self.wait(lambda: self.expired_in(others, victim), EXPIRE_DEADLINE_S,
                          f"node {victim.index} expired by the others while paused")
                self.sleep(self.rng.uniform(0.0, 2.0))
            finally:
                victim.signal(signal.SIGCONT)
            fault.end = time.monotonic()
        elif kind == "partition":
            self.cluster.network.set_link(victim.ns, False)
            try:
                self.wait(lambda: self.expired_in(others, victim), EXPIRE_DEADLINE_S,
                          f"node {victim.index} expired by the others while cut off")
                self.sleep(self.rng.uniform(0.0, 2.0))
            finally:
                self.cluster.network.set_link(victim.ns, True)
            fault.end = time.monotonic()
            self.run.cut_off[victim.index].append((fault.start, fault.end))
        else:
            raise ValueError(kind)
        fault.healthy = self.wait_healthy(f"{kind} of node {victim.index}")
        # a woken or healed node reads what it has until it caught up: count that as cut off too
        if kind == "partition":
            start, _ = self.run.cut_off[victim.index].pop()
            self.run.cut_off[victim.index].append((start, fault.healthy))
        self.say(f"nemesis {self.ago()}: healthy again ({fault.healthy - fault.start:.1f}s after the {kind})")
        self.run.faults.append(fault)
        return fault

    def _start_again(self, node: Node) -> None:
        try:
            node.start("run")
        except RuntimeError as exc:
            self.run.violation(f"node {node.index} did not start again: {exc}")
            raise

    def quiet(self, seconds: float) -> None:
        start = time.monotonic()
        self.sleep(seconds)
        self.run.windows.append((start, time.monotonic()))

    def play(self, kinds: list[str], quiet_s: tuple[float, float]) -> None:
        for kind in kinds:
            self.inject(kind)
            self.quiet(self.rng.uniform(*quiet_s))


# --- the history ------------------------------------------------------------------------------------
def load_history(paths: list[Path]) -> list[dict[str, Any]]:
    entries = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                entries.append(json.loads(line))
    return entries


def _overlaps(t0: float, t1: float, spans: list[tuple[float, float]]) -> bool:
    return any(t0 <= b and t1 >= a for a, b in spans)


def _inside(t0: float, t1: float, windows: list[tuple[float, float]]) -> tuple[float, float] | None:
    for a, b in windows:
        if a + GRACE_S <= t0 and t1 <= b:
            return a, b
    return None


class NameModel:
    """One name in a directory: None (absent) or its content. See nemesis_client.py for the ops."""

    def init(self) -> Hashable:
        return None

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        out = op.output
        present = state is not None
        if op.op == "get":
            if out is UNKNOWN:
                return True, state
            return (out == "ENOENT" and not present) or (present and out == "=" + str(state)), state
        if op.op == "put":
            return True, op.input
        if op.op == "create_excl":
            if out is UNKNOWN:
                return True, state if present else ""
            if out == "ok":
                return not present, ""
            return present and out == "EEXIST", state
        if op.op == "create":
            return out is UNKNOWN or out == "ok", state if present else ""
        if op.op == "unlink":
            if out is UNKNOWN:
                return True, None
            if out == "ok":
                return present, None
            return out == "ENOENT" and not present, state
        raise ValueError(op.op)


@dataclass
class Verdict:
    summary: str
    violations: list[str]


def check_results(entries: list[dict[str, Any]], run: Run) -> list[str]:
    """Each result one POSIX allows; fault errors only around faults; nothing stuck or slow."""
    problems: list[str] = []
    for e in entries:
        op, out = e["op"], e["output"]
        where = f"client {e['client']} on node {e['node']}: {op} {e.get('key')} [{e['t0']:.2f}, {e.get('t1')}]"
        if e.get("stuck"):
            problems.append(f"{where} never returned (hung)")
            continue
        t0, t1 = e["t0"], e["t1"]
        down = bool(e.get("unmounted")) or _overlaps(t0, t1, run.down.get(e["node"], []))
        base = "=" if isinstance(out, str) and out.startswith("=") else out
        if op == "create" and out == "EEXIST":
            problems.append(f"{where}: EEXIST from open(O_CREAT) without O_EXCL")
        elif base in ALLOWED[op]:
            if base == "ENOENT" and down:
                continue  # the mount was detached: the name was looked up in the empty mount point
        elif base == "ENOENT" and down:
            continue
        elif base in FAULT_ERRNOS:
            window = _inside(t0, t1, run.windows)
            if window is not None:
                problems.append(f"{where}: {out} at {e['stage']} with no fault in progress "
                                f"(quiet window {window[0]:.1f}-{window[1]:.1f})")
        else:
            problems.append(f"{where}: unexpected result {out} at {e['stage']}")
        if base in ALLOWED[op] and _inside(t0, t1, run.windows) and t1 - t0 > SLOW_OP_S:
            problems.append(f"{where}: took {t1 - t0:.1f}s with no fault in progress")
    return problems


def namespace_operations(entries: list[dict[str, Any]], run: Run) -> dict[str, list[Operation]]:
    """Per key, the operations the checker sees (outcomes unknown to the client: may have happened)."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for e in entries:
        op = e["op"]
        if op == "append" or (op == "put" and e["stage"] == "prepare"):
            continue  # appends are checked as records; a put that failed before its rename did nothing
        out = e["output"]
        t0 = e["t0"]
        t1 = e["t1"] if e.get("t1") is not None else math.inf
        down = bool(e.get("unmounted")) or _overlaps(t0, t1, run.down.get(e["node"], []))
        base = "=" if isinstance(out, str) and out.startswith("=") else out
        known = not e.get("stuck") and base in ALLOWED[op] and not (base == "ENOENT" and down)
        if op == "get":
            if not known or _overlaps(t0, t1, run.cut_off.get(e["node"], [])):
                continue  # nothing learned; or read on a cut-off node, which may serve what it has
            by_key[e["key"]].append(Operation(e["client"], op, e["key"], None, out, t0, max(t1, t0 + 1e-6)))
        elif known or base in FAULT_ERRNOS or e.get("stuck") or (base == "ENOENT" and down):
            value = e.get("input") if op == "put" else None
            output = out if known else UNKNOWN
            end = max(t1, t0 + 1e-6) if known else math.inf
            by_key[e["key"]].append(Operation(e["client"], op, e["key"], value, output, t0, end))
    return by_key


def check_linearizable(by_key: dict[str, list[Operation]]) -> tuple[list[str], int, int]:
    """(violations, keys checked, keys left undecided because the search ran past its budget)."""
    model = NameModel()
    problems, undecided = [], 0
    for key in sorted(by_key):
        ops = by_key[key]
        try:
            ok, _steps = check_single(model, ops, LIN_MAX_STEPS)
        except CheckBudgetExceeded:
            undecided += 1
            continue
        if not ok:
            lines = [f"the history of {key!r} is not linearizable ({len(ops)} operations):"]
            for o in sorted(ops, key=lambda o: o.call_time)[:60]:
                end = "inf" if math.isinf(o.return_time) else f"{o.return_time:.3f}"
                lines.append(f"    [{o.call_time:.3f}, {end}] client {o.client_id}: {o.op}({o.input!r}) -> {o.output!r}")
            problems.append("\n".join(lines))
    return problems, len(by_key), undecided


def check_logs(entries: list[dict[str, Any]], contents: dict[str, dict[int, bytes]]) -> tuple[list[str], int]:
    """Every acknowledged record present, whole, once, in order; the same bytes on every node.
    `contents`: log name -> node index -> bytes. Returns (violations, records found)."""
    problems: list[str] = []
    acked: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for e in entries:
        if e["op"] == "append" and e["output"] == "ok":
            acked[e["key"]].add((e["client"], e["input"]))
    found_total = 0
    for log in sorted(set(contents) | set(acked)):
        copies = contents.get(log, {})
        if not copies:
            problems.append(f"log {log}: could not be read on any node")
            continue
        first_node, data = next(iter(copies.items()))
        for node, other in copies.items():
            if other != data:
                problems.append(f"log {log}: node {node} reads {len(other)} bytes, node {first_node} {len(data)}")
        if len(data) % 64:
            problems.append(f"log {log}: {len(data)} bytes, not whole records (a torn record)")
        seen: dict[tuple[int, int], int] = {}
        last: dict[int, int] = {}
        for offset in range(0, len(data) - len(data) % 64, 64):
            rec = parse_record(data[offset : offset + 64], log)
            if rec is None:
                problems.append(f"log {log}: torn or foreign record at offset {offset}: {data[offset:offset + 64]!r}")
                continue
            found_total += 1
            if rec in seen:
                problems.append(f"log {log}: record {rec} twice (offsets {seen[rec]} and {offset})")
            seen[rec] = offset
            writer, seq = rec
            if seq <= last.get(writer, -1):
                problems.append(f"log {log}: writer {writer}'s record {seq} after its record {last[writer]}")
            last[writer] = max(seq, last.get(writer, -1))
        missing = sorted(acked.get(log, set()) - set(seen))
        if missing:
            problems.append(f"log {log}: {len(missing)} acknowledged records missing, e.g. {missing[:5]}")
    return problems, found_total


def check_progress(entries: list[dict[str, Any]], run: Run, clients: list[int]) -> list[str]:
    """In every quiet window (after its grace), every client completes operations and every writer
    that tried appends got one through."""
    problems = []
    by_client: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in entries:
        if not e.get("stuck"):
            by_client[e["client"]].append(e)
    for a, b in run.windows:
        start = a + GRACE_S
        if b - start < 2.0:
            continue
        for client in clients:
            mine = [e for e in by_client[client] if start <= e["t1"] <= b]
            done = [e for e in mine if e["output"] == "ok" or str(e["output"]).startswith("=")
                    or e["output"] in ("EEXIST", "ENOENT")]
            if not done:
                problems.append(f"client {client} completed nothing in the quiet window {a:.1f}-{b:.1f}; "
                                f"its operations then: {_ops_around(by_client[client], a, b)}")
                continue
            tried = [e for e in by_client[client] if e["op"] == "append" and start <= e["t0"] and e["t1"] <= b]
            if tried and not any(e["output"] == "ok" for e in tried):
                problems.append(f"client {client}'s appends all failed in the quiet window {a:.1f}-{b:.1f}: "
                                f"{Counter(e['output'] for e in tried)}")
    return problems


def _ops_around(entries: list[dict[str, Any]], a: float, b: float, limit: int = 4) -> str:
    """The operations overlapping [a, b] (at most `limit`: the last ones, so the one still under
    way at the window's end is among them), times relative to a: what a stalled client was waiting in."""
    around = [e for e in entries if e["t0"] <= b and e["t1"] >= a][-limit:]
    if not around:
        return "none (the client started nothing)"
    return "; ".join(f"{e['op']} {e.get('key', '')} {e['t0'] - a:+.2f}..{e['t1'] - a:+.2f}s -> {e['output']}"
                     + (f" at {e['stage']}" if e.get("stage") else "")
                     + (f" (steps {e['steps']})" if e.get("steps") else "") for e in around)


def check_fairness(entries: list[dict[str, Any]], run: Run, appenders: list[int]) -> tuple[list[str], dict[int, int]]:
    """The nonstop appenders of every node share the first shared log: over the quiet windows none
    may get less than 1/FAIR_SHARE of what the busiest got (the leader's writer used to take the
    write lease back each time it was handed over, and the others waited up to 60 s)."""
    got = Counter({client: 0 for client in appenders})
    for e in entries:
        if (e["client"] in got and e["op"] == "append" and e["key"] == "s0" and not e.get("stuck")
                and e["output"] == "ok" and _inside(e["t0"], e["t1"], run.windows)):
            got[e["client"]] += 1
    busiest = max(got.values(), default=0)
    starved = {c: n for c, n in got.items() if n * FAIR_SHARE < busiest}
    problems = [f"writers {sorted(starved)} starved on the shared log: acknowledged appends in quiet windows "
                f"per writer {dict(sorted(got.items()))}"] if starved else []
    return problems, dict(got)


def summarize(entries: list[dict[str, Any]], run: Run, *, records: int, keys: int, undecided: int) -> str:
    ops = Counter(e["op"] for e in entries)
    outcomes = Counter("stuck" if e.get("stuck") else ("ok" if e["output"] == "ok" or str(e["output"]).startswith("=")
                                                       else e["output"]) for e in entries)
    faults = Counter(f"{f.kind} ({f.role})" for f in run.faults)
    quiet_appends = [e["t1"] - e["t0"] for e in entries if e["op"] == "append" and not e.get("stuck")
                     and e["output"] == "ok" and e["key"].startswith("s") and _inside(e["t0"], e["t1"], run.windows)]
    recoveries = [f.healthy - f.start for f in run.faults]
    per_writer = Counter(e["client"] for e in entries if e["op"] == "append" and not e.get("stuck")
                         and e["output"] == "ok" and e["key"].startswith("s") and _inside(e["t0"], e["t1"], run.windows))
    lines = [
        f"nemesis seed {run.seed}: {len(entries)} operations {dict(ops)}",
        f"  outcomes {dict(outcomes)}",
        f"  faults {dict(faults)}; recovery {min(recoveries, default=0):.1f}-{max(recoveries, default=0):.1f}s; "
        f"{len(run.windows)} quiet windows; {run.unplanned_exits} unplanned daemon exits",
        f"  {records} records in {SHARED_LOGS} shared and {len({e['key'] for e in entries if e['op'] == 'append'}) - SHARED_LOGS}"
        f" private logs; shared-log appends in quiet windows: {len(quiet_appends)}, slowest "
        f"{max(quiet_appends, default=0):.2f}s; per writer {dict(sorted(per_writer.items()))}",
        f"  {keys} namespace keys checked for linearizability ({undecided} undecided: search budget)",
        f"  violations: {len(run.violations)}",
    ]
    return "\n".join(lines)


class Workers:
    """The client processes (one per node), started before any fault."""

    def __init__(self, nodes: list[Node], out_dir: Path, *, seed: int, clients: int, t0: float, until: float,
                 env: dict[str, str]) -> None:
        import subprocess
        import sys

        from tests.support.daemon import REPO

        self.paths = [out_dir / f"history-{n.index}.jsonl" for n in nodes]
        self.procs = []
        script = REPO / "tests" / "support" / "nemesis_client.py"
        for node, path in zip(nodes, self.paths):
            self.procs.append(subprocess.Popen(
                [sys.executable, str(script), "--node", str(node.index), "--mount", str(node.mount), "--clients",
                 str(clients), "--seed", str(seed), "--until", repr(until), "--t0", repr(t0), "--out", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd="/",
                start_new_session=True))
        self.output: list[list[str]] = [[] for _ in self.procs]
        for proc, out in zip(self.procs, self.output):
            threading.Thread(target=_pump, args=(proc, out), daemon=True).start()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(any(line.startswith("ready") for line in out) for out in self.output):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"nemesis clients did not start: {self.output}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 120.0) -> list[str]:
        """Ask them to finish (stdin closed) and wait; returns what went wrong."""
        problems = []
        for proc in self.procs:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + timeout_s
        for k, proc in enumerate(self.procs):
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except Exception:
                problems.append(f"the clients of node {k + 1} did not end: {self.output[k][-5:]}")
                self.kill()
            else:
                if proc.returncode != 0:
                    problems.append(f"the clients of node {k + 1} failed ({proc.returncode}): {self.output[k][-20:]}")
        return problems

    def kill(self) -> None:
        import os

        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _pump(proc: Any, sink: list[str]) -> None:
    for line in proc.stdout:
        sink.append(line.rstrip("\n"))


def read_logs(nodes: list[Node], names: list[str], timeout_s: float = 60.0) -> tuple[dict[str, dict[int, bytes]], list[str]]:
    """Every log's bytes as each node reads it (each read on a thread with a deadline: a hung
    mount is reported, never a hung test)."""
    contents: dict[str, dict[int, bytes]] = defaultdict(dict)
    problems: list[str] = []
    for node in nodes:
        for name in names:
            box: dict[str, Any] = {}

            def read(node: Node = node, name: str = name, box: dict[str, Any] = box) -> None:
                try:
                    box["data"] = (node.mount / "logs" / name).read_bytes()
                except OSError as exc:
                    box["error"] = exc

            thread = threading.Thread(target=read, daemon=True)
            thread.start()
            thread.join(timeout_s)
            if thread.is_alive():
                problems.append(f"reading log {name} on node {node.index} hung")
            elif "error" in box:
                problems.append(f"reading log {name} on node {node.index}: {box['error']}")
            else:
                contents[name][node.index] = box["data"]
    return contents, problems


__all__ = ["KINDS", "Fault", "NameModel", "Nemesis", "Run", "Workers", "check_fairness", "check_linearizable",
           "check_logs", "check_progress", "check_results", "load_history", "namespace_operations", "read_logs", "summarize"]
