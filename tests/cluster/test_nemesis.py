"""The cluster under faults, Jepsen style (issue 11): a real three-node cluster (separate daemons in
network namespaces on one shared image, short leases: tests.support.cluster.FAST_LEASES), clients
on every node running a mixed workload, and a nemesis that kills, pauses, cuts off and restarts
nodes — the leader or not — one at a time, chosen by a seeded random generator.

What is checked afterwards (tests/support/nemesis.py has the details):
- no daemon exited without being told to (a node woken from a pause past its lease used to exit);
- every result is one POSIX allows: no EEXIST for O_CREAT without O_EXCL (three nodes creating one
  name at once used to get it), fault errors only around faults, nothing hangs;
- the namespace history is linearizable (strict coherence mode: the one where that is promised);
- every acknowledged (fsynced) record is in its log, whole, once, in order, on every node;
- in every quiet window every client makes progress and no operation takes more than a few seconds;
  the nonstop appenders of the three nodes, all on one shared log, each get a fair share of it (a
  writer starved by the leader's appends used to wait 60 s for EIO);
- fsck of every member is clean after a clean stop.

Runs:
- `test_nemesis_short` (default suite, about two minutes): every kind of fault once, in a seeded
  random order;
- `test_nemesis_long` (marked slow; `--slow`): random faults for AWSOMEFS_NEMESIS_MINUTES (10 by default, 5 in CI: scripts/test.sh; run 30 or more before changing the cluster); AWSOMEFS_NEMESIS_KINDS narrows the kinds.
Seeded: AWSOMEFS_NEMESIS_SEED=N replays the same schedule and workload choices (timing differs);
a failure prints the seed and the command.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.network import PrivateNetwork
from tests.support import seeds
from tests.support.cluster import Node, cluster_in
from tests.support.nemesis import (
    KINDS,
    Nemesis,
    Run,
    Workers,
    check_fairness,
    check_linearizable,
    check_logs,
    check_progress,
    check_results,
    load_history,
    namespace_operations,
    read_logs,
    summarize,
)
from tests.support.nemesis_client import SHARED_LOGS

CLIENTS_PER_NODE = 2
QUIET_S = (4.0, 6.0)
SNAPSHOT_ENTRIES = 2_000
"""Compact the metadata log often (10,000 by default): a node that returns from a fault then
often catches up by snapshot, the path that once left its proposals unanswered for 10 s."""
LONG_MINUTES = float(os.environ.get("AWSOMEFS_NEMESIS_MINUTES", "10"))
LONG_KINDS = tuple(os.environ.get("AWSOMEFS_NEMESIS_KINDS", ",".join(KINDS)).split(","))
"""The long runs' faults: AWSOMEFS_NEMESIS_KINDS=partition,pause repeats only those (to chase one)."""


def nemesis_seed() -> int:
    text = os.environ.get("AWSOMEFS_NEMESIS_SEED")
    return int(text) if text else seeds.fresh_one("nemesis")  # fresh each run: tests/support/seeds.py


def replay(seed: int, test: str) -> str:
    slow = " --slow" if test in ("test_nemesis_long", "test_nemesis_delegations", "test_nemesis_tiering") else ""
    return f"AWSOMEFS_NEMESIS_SEED={seed} .venv/bin/python -m pytest 'tests/cluster/test_nemesis.py::{test}'{slow} -s"


def run_nemesis(network: PrivateNetwork, root: Path, seed: int, test: str,
                schedule: Callable[[Nemesis], None], *, coherence: str = "strict",
                extra_env: dict[str, str] | None = None,
                before_stop: Callable[[list[Node]], list[str]] | None = None) -> None:
    """`coherence`: the mounts' mode. Strict (no kernel caches) is where the namespace history is
    promised to be linearizable, and it is checked; in the default mode (close-to-open), nodes
    change directories under delegations, ahead of the log, and every other check applies.
    `extra_env`: more settings for the daemons (and their fsck); `before_stop`: more checks on the
    running members after the run (each problem is a violation)."""
    print(f"\nnemesis seed {seed}, coherence {coherence}; replay: {replay(seed, test)}", flush=True)
    run = Run(seed)
    env = {"AWSOMEFS_MOUNT__COHERENCE": coherence, "AWSOMEFS_CLUSTER__SNAPSHOT_ENTRIES": str(SNAPSHOT_ENTRIES),
           **(extra_env or {})}
    with cluster_in(network, root, env=env) as cluster:
        nodes = cluster.form(3)
        first = nodes[0].mount
        for directory in ("ns", "tmp", "logs"):
            (first / directory).mkdir()
        for k in range(SHARED_LOGS):
            (first / "logs" / f"s{k}").write_bytes(b"")
        # From here on this process opens nothing on the mounts until the run is over: it forks
        # (ip, nsenter) while nodes are stopped (tests/support/nemesis_client.py says why).
        t0, wall0 = time.monotonic(), time.time()
        print(f"nemesis times are seconds after monotonic {t0:.3f} (the histories' t0/t1 are monotonic); "
              f"histories and daemon logs (node*.log) in {root}", flush=True)
        workers = Workers(nodes, root, seed=seed, clients=CLIENTS_PER_NODE, t0=t0, until=t0 + 7 * 24 * 3600,
                          env=cluster.env)
        nemesis = Nemesis(cluster, nodes, run)
        try:
            workers.wait_ready()
            nemesis.wait_healthy("the start")
            nemesis.quiet(nemesis.rng.uniform(*QUIET_S))
            schedule(nemesis)
        finally:
            for problem in workers.stop():
                run.violation(problem)
        nemesis.wait_healthy("the run")
        entries = load_history(workers.paths)
        # the shared logs, and every private log with an acknowledged record (one whose creation
        # never succeeded need not exist)
        logs = sorted({e["key"] for e in entries if e["op"] == "append" and e["output"] == "ok"}
                      | {f"s{k}" for k in range(SHARED_LOGS)})
        contents, unreadable = read_logs(nodes, logs)
        for problem in unreadable:
            run.violation(problem)
        for problem in before_stop(nodes) if before_stop is not None else []:
            run.violation(problem)
        stop_all(nodes, run)
        for node in nodes:
            fsck = node.cli("fsck", "--verify-data", "--device", str(cluster.device), timeout_s=300)
            if fsck.returncode != 0:
                run.violation(f"fsck of node {node.index}'s state: exit status {fsck.returncode}:\n"
                              f"{fsck.stdout[-3000:]}{fsck.stderr[-2000:]}")
    for problem in check_results(entries, run):
        run.violation(problem)
    keys = undecided = 0
    if coherence == "strict":
        lin_problems, keys, undecided = check_linearizable(namespace_operations(entries, run))
        for problem in lin_problems:
            run.violation(problem)
    log_problems, records = check_logs(entries, contents)
    for problem in log_problems:
        run.violation(problem)
    clients = [10 * n.index + k for n in nodes for k in range(CLIENTS_PER_NODE)]
    for problem in check_progress(entries, run, clients):
        run.violation(problem)
    fairness, _shares = check_fairness(entries, run, [10 * n.index for n in nodes])  # client 0 of each node
    for problem in fairness:
        run.violation(problem)
    summary = summarize(entries, run, records=records, keys=keys, undecided=undecided)
    print(summary, flush=True)
    if run.violations:
        print(daemon_logs_around(run.violations, nodes, t0_wall=wall0 - t0), flush=True)
        shown = "\n".join(f"- {v}" for v in run.violations[:40])
        more = f"\n... and {len(run.violations) - 40} more" if len(run.violations) > 40 else ""
        pytest.fail(f"{summary}\n{len(run.violations)} violations:\n{shown}{more}\nreplay: {replay(seed, test)}",
                    pytrace=False)


WINDOW = re.compile(r"quiet window (\d+\.\d+)-(\d+\.\d+)")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
LOG_BEFORE_S = 15.0
MAX_LOG_LINES = 60


def daemon_logs_around(violations: list[str], nodes: list[Node], *, t0_wall: float) -> str:
    """Every daemon's log lines from LOG_BEFORE_S before each quiet window a violation names to
    its end: what CI prints of a stall (the histories and logs stay behind on its machine).
    `t0_wall`: wall-clock time minus monotonic time (the windows are monotonic)."""
    spans = sorted({(float(a) + t0_wall - LOG_BEFORE_S, float(b) + t0_wall)
                    for v in violations for a, b in WINDOW.findall(v)})
    out = []
    for start, end in spans:
        for node in nodes:
            lines = [line for line in node.log_path.read_text(errors="replace").splitlines()
                     if (when := _log_time(line)) is not None and start <= when <= end]
            out.append(f"--- node {node.index}'s log, {time.strftime('%H:%M:%S', time.localtime(start))}-"
                       f"{time.strftime('%H:%M:%S', time.localtime(end))} ({len(lines)} lines, the last "
                       f"{min(len(lines), MAX_LOG_LINES)}):")
            out.extend(line[:300] for line in lines[-MAX_LOG_LINES:])
    return "\n".join(out)


def _log_time(line: str) -> float | None:
    match = LOG_TIME.match(line)
    if match is None:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000


def stop_all(nodes: list[Node], run: Run) -> None:
    """A clean stop of every member (at once): each must exit 0 and unmount."""
    for node in nodes:
        node.signal(signal.SIGINT)
    for node in nodes:
        assert node.proc is not None
        try:
            code = node.proc.wait(90)
        except Exception:
            run.violation(f"node {node.index} did not stop within 90s of SIGINT")
            node.kill()
            continue
        if code != 0:
            run.violation(f"node {node.index} stopped with exit status {code} on SIGINT:\n{node.logs(30)}")
        node.stop()


@pytest.mark.budget(300)  # every kind of fault once: about two minutes alone
def test_nemesis_short(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> None:
    seed = nemesis_seed()

    def every_kind_once(nemesis: Nemesis) -> None:
        nemesis.play(nemesis.rng.sample(KINDS, len(KINDS)), QUIET_S)

    run_nemesis(netns_network(3), tmp_path, seed, "test_nemesis_short", every_kind_once)


@pytest.mark.slow
@pytest.mark.timeout(int(LONG_MINUTES * 60 + 900))
def test_nemesis_long(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> None:
    seed = nemesis_seed()

    def random_faults(nemesis: Nemesis) -> None:
        end = time.monotonic() + LONG_MINUTES * 60
        while time.monotonic() < end:
            nemesis.play([nemesis.rng.choice(LONG_KINDS)], QUIET_S)

    run_nemesis(netns_network(3), tmp_path, seed, "test_nemesis_long", random_faults)


@pytest.mark.slow
@pytest.mark.timeout(int(LONG_MINUTES * 60 + 900))
def test_nemesis_delegations(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> None:
    """The long run in the default coherence mode: directories change under delegations, ahead of
    the log, while nodes are killed, paused and cut off (a delegation recalled from a paused or
    partitioned node must lose or reorder nothing it acknowledged and synced)."""
    seed = nemesis_seed()

    def random_faults(nemesis: Nemesis) -> None:
        end = time.monotonic() + LONG_MINUTES * 60
        while time.monotonic() < end:
            nemesis.play([nemesis.rng.choice(LONG_KINDS)], QUIET_S)

    run_nemesis(netns_network(3), tmp_path, seed, "test_nemesis_delegations", random_faults,
                coherence="close-to-open")


@pytest.mark.slow
def test_nemesis_tiering(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> None:
    """Every kind of fault once while the leader tiers whatever has been quiet for a second (the
    logs the clients append to, the files they create) to the S3 test server, which runs in a
    namespace of its own on the nodes' network, and repacks and deletes what dies. Every check of
    the short run applies, and fsck --verify-data reads the tiered data back from the store."""
    pytest.importorskip("moto", reason="the S3 test server needs moto (scripts/install.sh test)")
    from tests.support.s3 import TEST_KEY_ID, TEST_SECRET, s3_server

    seed = nemesis_seed()
    network = netns_network(4)  # the fourth namespace holds the store; the cluster is the first three

    def every_kind_once(nemesis: Nemesis) -> None:
        nemesis.play(nemesis.rng.sample(KINDS, len(KINDS)), QUIET_S)

    with s3_server(network.nodes[3]) as s3:
        tiering = {"AWSOMEFS_TIER__ENDPOINT": s3.endpoint, "AWSOMEFS_TIER__BUCKET": s3.bucket,
                   "AWSOMEFS_TIER__COLD_AFTER_S": "1", "AWSOMEFS_TIER__SCAN_INTERVAL_S": "0.5",
                   "AWSOMEFS_TIER__OBJECT_BYTES": "1M", "AWSOMEFS_TIER__MIN_FILE_BYTES": "0",
                   "AWSOMEFS_TIER__PARTIAL_OBJECT_AFTER_S": "0",
                   "AWSOMEFS_TIER__GC_GRACE_S": "5", "AWSOMEFS_TIER__READ_TIMEOUT_S": "5",
                   "AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET}
        run_nemesis(network, tmp_path, seed, "test_nemesis_tiering", every_kind_once, extra_env=tiering,
                    before_stop=tiered_something)


def tiered_something(nodes: list[Node]) -> list[str]:
    """The run did tier: the objects table holds live objects, none is left uploading."""
    import json

    status = nodes[0].cli("tier", "status", "--json")
    if status.returncode != 0:
        return [f"tier status failed: {status.stderr[-500:]}"]
    info = json.loads(status.stdout)
    print(f"tiering: {info['objects']} live objects, {info['tiered_bytes']} bytes of file data, "
          f"{info['dead_objects']} dead, {info['pending_uploads']} uploading", flush=True)
    return [] if info["objects"] > 0 else ["nothing was tiered during the run"]
