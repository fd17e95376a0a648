"""Cross-site replication benchmarks (issue 15): two single-node sites as real daemons, each in a
network namespace, the WAN proxy between them with a one-way delay (tests/support/sites.py).

As root (from another user: sudo in front), from the repository root:

    .venv/bin/python bench/site_bench.py [--delay-ms 50] [--runs 3] [--members N] [--json F]
        [--only write,untar,rate,lag,catch_up,delta,two_sided] [--pushes-in-flight 1,8]

`--members 3`: site a is a cluster of three nodes (its creates go through a member that does not
run the link, the others' figures through the leader that does), b a single node.

Figures, medians of `--runs` runs with every run's value beside them:
- the write path's cost: creates/s of empty files on site a before it is linked and while it is
  linked (every create then also ships, on the same two cores), and linked with the link cut (the
  cost of capturing alone), next to ext4 on a loop device (the reference);
- replication lag under a steady load on a: small files created and 1 MiB files written at a
  fixed pace; for each, the time from its close on a to when site b shows it with its whole size
  (b's mount polled every 5 ms): p50 and p99;
- catch-up after a partition: the link cut, a batch of small files and 1 MiB files written on a,
  the link healed; operations and MiB per second until b has them all;
- a large file changed in places (delta transfer, design note 50): a `--delta-mib` file written on
  a, then 16 runs of 4 KiB rewritten in it; for each step the seconds until b has it (a marker
  file made after it, applied after it in stamp order, shows on b) and the bytes a sent;
- untar of a 4,000-file source tree on a unlinked and linked: seconds, and their ratio;
- a two-sided catch-up (`--only two_sided`, not in the default set): both sites write
  `--two-sided-files` files while cut off, then the link heals; seconds until both have sent
  everything, and the slowest local create on each side meanwhile (issue 47's ≤ 100 ms); then
  the seconds `site verify` takes to compare both trees (`two_sided_verify_s`);
- the link's rate (issue 47): a backlog of `--drain-files` creates (and `--drain-mib` 1 MiB files)
  made with the link cut, then healed: operations (MiB) per second from b's first applied one to
  a's outbox empty. That is the most the link sustains; set beside what a writes (its linked
  creates/s times the operations a create makes), it is `link_to_write_ratio`. Then the lag of
  small files written at half that rate (`lag_half_*`; 3 operations a file).

`--pushes-in-flight 1,8` alternates runs between the values of `[site] pushes_in_flight` (1: one
push at a time, the path before the window), each run on fresh sites, so the old path and the new
are measured in the same invocation under the same load; `--sources OLD,NEW` alternates the
daemons' source trees the same way (this bench and its harness stay this checkout's).
The drains also give each daemon's CPU per operation drained (`drain_a_cpu_us_per_op`,
`drain_b_cpu_us_per_op`: the receiving site's is what bounds the link), less swayed by other
work on the machine than the rates.
The delay is the proxy's, one way; the machine's two cores run both sites, the proxy and this
script, so these figures bound what the replication costs here, not what two real sites see.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from targets import cpu_seconds, ext4_target  # noqa: E402
from workloads import ensure_tarball  # noqa: E402

from tests.support.sites import (  # noqa: E402
    ClusterSite,
    Site,
    cluster_and_site,
    link,
    make_backlog,
    pending,
    two_sites,
    wait_converged,
)

MIB = 1 << 20


def creates_per_s(directory: Path, count: int) -> float:
    directory.mkdir()
    start = time.perf_counter()
    for i in range(count):
        os.close(os.open(directory / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    return count / (time.perf_counter() - start)


def steady_lag(a: Path, b: Path, seconds: float, creates_per_s: float, mib_per_s: float) -> tuple[list[float], float]:
    """Lags in seconds of every file written on `a` at the given pace, as seen on `b`, and the
    pace reached (files a second: one writer may fall short of the pace asked)."""
    written: dict[str, tuple[float, int]] = {}
    order: list[str] = []
    """The names written, in order (appended after `written`)."""
    seen: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        # b applies a's operations in a's order: only the first files not seen yet need a look
        # (a look at every file not seen took the writer's share of the interpreter under load)
        while not done.is_set() or len(seen) < len(written):
            for name in order[len(seen):len(seen) + 64]:
                try:
                    if os.stat(b / name).st_size != written[name][1]:
                        break
                except FileNotFoundError:
                    break
                seen[name] = time.monotonic()
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    payload = os.urandom(MIB)
    start = time.monotonic()
    i = 0
    next_create, next_big = start, start
    while time.monotonic() - start < seconds:
        now = time.monotonic()
        while now >= next_create and time.monotonic() - start < seconds:  # behind the pace: catch up
            name = f"small{i}"
            (a / name).write_bytes(b"x")
            written[name] = (time.monotonic(), 1)
            order.append(name)
            next_create += 1 / creates_per_s
            i += 1
        if mib_per_s and now >= next_big:
            name = f"big{i}"
            (a / name).write_bytes(payload)
            written[name] = (time.monotonic(), MIB)
            order.append(name)
            next_big += 1 / mib_per_s
            i += 1
        time.sleep(0.001)
    reached = len(written) / (time.monotonic() - start)
    done.set()
    watcher.join(120)
    return [seen[name] - t for name, (t, _size) in written.items() if name in seen], reached


def catch_up(a: Path, b: Path, cut: Callable[[], None], heal: Callable[[], None], received: Callable[[], int],
             files: int, big_files: int) -> tuple[float, float]:
    """(operations/s, MiB/s) replaying a partition's writes (`received`: operations b applied so far)."""
    cut()
    payload = os.urandom(MIB)
    (a / "batch").mkdir()
    for i in range(files):
        (a / "batch" / f"s{i}").write_bytes(b"y")
    for i in range(big_files):
        (a / "batch" / f"b{i}").write_bytes(payload)
    os.sync()
    before = received()
    start = time.monotonic()
    heal()
    want = files + big_files
    deadline = start + 600
    while time.monotonic() < deadline:
        try:
            names = os.listdir(b / "batch")
            if len(names) == want and all(os.stat(b / "batch" / f"b{i}").st_size == MIB for i in range(big_files)):
                break
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    return (received() - before) / elapsed, big_files / elapsed


def until_shown(a: Path, b: Path, marker: str, sent: Callable[[], int], change: Callable[[], None]) -> tuple[float, int]:
    """(seconds, bytes a sent) from `change` on a until b shows a marker made after it."""
    before = sent()
    start = time.monotonic()
    change()
    (a / marker).write_bytes(b"")
    deadline = start + 600
    while not (b / marker).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{marker} did not reach b in 600 s")
        time.sleep(0.01)
    return time.monotonic() - start, sent() - before


def delta_step(a: Path, b: Path, size_mib: int, sent: Callable[[], int]) -> dict[str, float]:
    """A large file written whole, then changed in 16 places of 4 KiB: time and bytes of each."""
    (a / "delta").mkdir()
    target = a / "delta" / "disk.img"

    def write_whole() -> None:
        with open(target, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MIB))
            os.fsync(f.fileno())

    def patch() -> None:
        with open(target, "r+b") as f:
            for i in range(16):
                f.seek(i * (size_mib * MIB // 16) + 12_345)
                f.write(os.urandom(4096))
            os.fsync(f.fileno())

    whole_s, whole_bytes = until_shown(a / "delta", b / "delta", "whole-done", sent, write_whole)
    patch_s, patch_bytes = until_shown(a / "delta", b / "delta", "patch-done", sent, patch)
    return {"delta_whole_s": whole_s, "delta_whole_mib_sent": whole_bytes / MIB,
            "delta_patch_s": patch_s, "delta_patch_kib_sent": patch_bytes / 1024}


def untar_s(tarball: Path, dest: Path) -> float:
    """Seconds `tar -x` takes to unpack `tarball` (read from memory) into `dest`, synced."""
    data = tarball.read_bytes()
    dest.mkdir()
    start = time.perf_counter()
    subprocess.run(["tar", "-x", "--no-same-owner", "-f", "-", "-C", str(dest)], input=data, check=True, timeout=600)
    subprocess.run(["sync", "-f", str(dest)], check=True, timeout=600)
    return time.perf_counter() - start


def drain(a: Path, cut: Callable[[], None], heal: Callable[[], None], pending: Callable[[], int],
          up: Callable[[], bool], files: int, big_files: int, name: str,
          cpu: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)) -> dict[str, float]:
    """A backlog made with the link cut (`files` empty files, `big_files` of 1 MiB), then healed:
    the operations it made, and their rate from the link being up again (a's shipper connected:
    the time it takes to notice the heal is not the link's rate) until a's outbox holds none."""
    cut()
    before = pending()
    (a / name).mkdir()
    start = time.perf_counter()
    for i in range(files):
        os.close(os.open(a / name / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    payload = os.urandom(MIB)
    for i in range(big_files):
        (a / name / f"b{i}").write_bytes(payload)
    written_s = time.perf_counter() - start
    os.sync()
    backlog = pending()
    deadline = time.monotonic() + 60
    while up() and time.monotonic() < deadline:  # the shipper's next heartbeat finds the link cut
        time.sleep(0.05)
    heal()
    healed = time.monotonic()
    deadline = healed + 1800
    while not up() and time.monotonic() < deadline:
        time.sleep(0.02)
    first = time.monotonic()
    cpu_first = cpu()
    while (now := pending()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if now:
        raise TimeoutError(f"{now} operations of a {backlog}-operation backlog still pending after 1800 s")
    elapsed = time.monotonic() - first
    cpu_a, cpu_b = (end - start for start, end in zip(cpu_first, cpu(), strict=True))
    ops = max(backlog - before, 1)
    return {"ops": backlog - before, "s": elapsed, "ops_per_s": (backlog - before) / elapsed,
            "a_cpu_us_per_op": cpu_a / ops * 1e6, "b_cpu_us_per_op": cpu_b / ops * 1e6,
            "mib_per_s": big_files / elapsed, "written_s": written_s, "noticed_s": first - healed}


class Prober:
    """A local create (open O_CREAT, close: five kernel requests) in `directory` every
    `interval_s`, each timed, in a thread of its own until `stop`: what a user of this site
    sees while it applies the other site's backlog."""

    def __init__(self, directory: Path, interval_s: float = 0.02) -> None:
        directory.mkdir()
        self.directory, self.interval_s = directory, interval_s
        self.times: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._done.is_set():
            start = time.perf_counter()
            os.close(os.open(self.directory / f"p{i}", os.O_CREAT | os.O_WRONLY, 0o644))
            self.times.append(time.perf_counter() - start)
            i += 1
            self._done.wait(self.interval_s)

    def stop(self) -> list[float]:
        self._done.set()
        self._thread.join(120)
        return self.times


def two_sided(a: Site | ClusterSite, b: Site | ClusterSite, cut: Callable[[], None], heal: Callable[[], None],
              files: int) -> dict[str, float]:
    """Both sites write `files` files each (one in ten renamed, one in fifty written:
    tests/support/sites.py's make_backlog) and then a marker with the link cut, then it heals:
    seconds from the heal (the shippers' reconnection included) until each site shows the
    other's marker (applied in stamp order: the backlog is in), and the slowest and 99th
    percentile local create on each side meanwhile (issue 47: ≤ 100 ms whatever the backlog),
    beside the slowest of the same creates with the link cut and nothing to apply (`idle`: this
    machine's noise). Nothing else asks the daemons anything meanwhile (a `site status` is a
    process of its own, a load on these cores). Then `site verify` on a, timed: it digests both
    whole trees, opening every file (on a cluster's leader each open is a read barrier: design
    note 123)."""
    cut()
    for site in (a, b):
        make_backlog(site.mount / f"two-sided-{site.name}", files, site.name)
        (site.mount / f"two-sided-{site.name}" / "zz-end").write_bytes(b"")
    os.sync()
    ops = pending(a) + pending(b)
    deadline = time.monotonic() + 60
    while (a.status()["link_up"] or b.status()["link_up"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # the shippers' next heartbeat finds the link cut
    idle = [Prober(site.mount / "probe-idle") for site in (a, b)]
    time.sleep(3)
    idle_times = [t for probe in idle for t in probe.stop()]
    probes = [Prober(site.mount / "probe") for site in (a, b)]
    heal()
    start = time.monotonic()
    markers = [b.mount / "two-sided-a" / "zz-end", a.mount / "two-sided-b" / "zz-end"]
    while not all(marker.exists() for marker in markers):
        if time.monotonic() > start + 1800:
            raise TimeoutError("the two-sided backlog did not drain in 1800 s")
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    times_a, times_b = (probe.stop() for probe in probes)
    wait_drained(a, b)
    started = time.monotonic()
    verified = a.cli("verify", timeout_s=3600)
    verify_s = time.monotonic() - started
    if verified.returncode != 0:
        raise AssertionError(f"site verify after the two-sided catch-up: {verified.stdout[:500]} {verified.stderr[-500:]}")
    return {"two_sided_verify_s": verify_s, "two_sided_ops": ops, "two_sided_s": elapsed, "two_sided_ops_per_s": ops / elapsed,
            "two_sided_max_create_a_ms": max(times_a) * 1000, "two_sided_max_create_b_ms": max(times_b) * 1000,
            "two_sided_p99_create_ms": percentile(times_a + times_b, 0.99) * 1000,
            "two_sided_idle_max_create_ms": max(idle_times) * 1000}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def daemons_cpu(a: Site | ClusterSite, b: Site | ClusterSite) -> tuple[float, float]:
    """CPU seconds of the daemon running each site's link (a cluster's: its leader's)."""
    def pid(site: Site | ClusterSite) -> int:
        daemon = site.leader() if isinstance(site, ClusterSite) else site.daemon
        assert daemon.proc is not None
        return daemon.proc.pid
    return cpu_seconds(pid(a)), cpu_seconds(pid(b))


def measure(args: argparse.Namespace, root: Path, window: int | None, source: Path | None = None) -> dict[str, float]:
    figures: dict[str, float] = {}
    if "write" in args.only:
        with ext4_target(root / "ext4", 2 << 30) as ext4:
            figures["ext4_creates_per_s"] = creates_per_s(ext4.path / "creates", args.creates)
    env = {} if window is None else {"AWSOMEFS_SITE__PUSHES_IN_FLIGHT": str(window)}
    if source is not None:  # the daemons run that tree's awsomefsd (an older build, say)
        env["PYTHONPATH"] = str(source)
    sites = two_sites(root / "sites", delay_ms=args.delay_ms, size=args.size, extra_env=env) if args.members == 1 \
        else cluster_and_site(root / "sites", members=args.members, delay_ms=args.delay_ms)
    tarball = ensure_tarball(root, 4000, 20240601) if "untar" in args.only else None
    with sites as (a, b, wan):
        # a cluster's creates go through a member that does not run the link
        writer = a.followers()[0].mount if isinstance(a, ClusterSite) else a.mount
        if "write" in args.only:
            # Not measured: a fresh daemon's first burst ran ~40 % faster than every later one on the
            # same daemon (10,413 and 9,888 creates/s against 6,572-7,197), which made the linked
            # bursts, all later ones, look that much costlier (capture_ratio 0.56 against ~0.78).
            creates_per_s(writer / "warm-up", args.creates)
        figures["unlinked_creates_per_s"] = creates_per_s(writer / "unlinked", args.creates)
        if tarball is not None:
            figures["unlinked_untar_s"] = untar_s(tarball, writer / "untar-unlinked")
            # keeps the initial sync (one transaction) what it was before the untar was measured
            shutil.rmtree(writer / "untar-unlinked")
        link(a, b)
        wait_converged(a, b, 300)

        def pending() -> int:
            outbound = a.status()["outbound"]
            assert isinstance(outbound, dict)
            return int(outbound["pending_operations"])

        if "write" in args.only:
            figures["linked_creates_per_s"] = creates_per_s(writer / "linked", args.creates)
            figures["write_path_ratio"] = figures["linked_creates_per_s"] / figures["unlinked_creates_per_s"]
            wait_converged(a, b, 300)
            wan.cut()  # linked, nothing sent meanwhile: what capturing costs, without shipping beside it
            figures["linked_cut_creates_per_s"] = creates_per_s(writer / "linked-cut", args.creates)
            figures["capture_ratio"] = figures["linked_cut_creates_per_s"] / figures["unlinked_creates_per_s"]
            wan.heal()
            wait_converged(a, b, 300)
        if tarball is not None:
            figures["linked_untar_s"] = untar_s(tarball, writer / "untar-linked")
            figures["untar_ratio"] = figures["unlinked_untar_s"] / figures["linked_untar_s"]
            wait_converged(a, b, 600)
        if "lag" in args.only:
            (a.mount / "steady").mkdir()
            lags, _ = steady_lag(a.mount / "steady", b.mount / "steady", args.steady_s, args.steady_creates,
                                 args.steady_mib)
            figures["lag_p50_s"] = percentile(lags, 0.5)
            figures["lag_p99_s"] = percentile(lags, 0.99)
            figures["lag_samples"] = len(lags)

        def received() -> int:
            inbound = b.status()["inbound"]
            assert isinstance(inbound, dict)
            return int(inbound["operations"])

        if "catch_up" in args.only:
            ops_s, mib_s = catch_up(a.mount, b.mount, wan.cut, wan.heal, received, args.catch_up_files,
                                    args.catch_up_mib)
            figures["catch_up_ops_per_s"] = ops_s
            figures["catch_up_mib_per_s"] = mib_s
            wait_converged(a, b, 300)

        def sent() -> int:
            outbound = a.status()["outbound"]
            assert isinstance(outbound, dict)
            return int(outbound["bytes"])

        if "delta" in args.only:
            figures.update(delta_step(a.mount, b.mount, args.delta_mib, sent))
            wait_converged(a, b, 300)
        if "two_sided" in args.only:
            figures.update(two_sided(a, b, wan.cut, wan.heal, args.two_sided_files))
            wait_drained(a, b)
        # last: its backlogs leave trees that `site verify` takes long to digest
        if "rate" in args.only:
            def up() -> bool:
                return bool(a.status()["link_up"])

            backlog = drain(a.mount, wan.cut, wan.heal, pending, up, args.drain_files, 0, "drain",
                            lambda: daemons_cpu(a, b))
            figures.update({f"drain_{key}": value for key, value in backlog.items() if key != "mib_per_s"})
            big = drain(a.mount, wan.cut, wan.heal, pending, up, 0, args.drain_mib, "drain-big")
            figures["drain_big_mib_per_s"] = big["mib_per_s"]
            # what one site writes, in operations: its creates/s (linked, if measured) times a create's operations
            writes = figures.get("linked_creates_per_s", figures["unlinked_creates_per_s"])
            figures["ops_per_create"] = backlog["ops"] / args.drain_files
            figures["local_write_ops_per_s"] = writes * figures["ops_per_create"]
            figures["link_to_write_ratio"] = backlog["ops_per_s"] / figures["local_write_ops_per_s"]
            wait_drained(a, b)
            (a.mount / "half").mkdir()
            # at half the link's rate: a small file written is 3 operations (a create, a name, a content)
            lags, figures["lag_half_files_per_s"] = steady_lag(a.mount / "half", b.mount / "half", args.steady_s,
                                                               backlog["ops_per_s"] / 2 / 3, 0)
            figures["lag_half_p50_s"] = percentile(lags, 0.5)
            figures["lag_half_p99_s"] = percentile(lags, 0.99)
            figures["lag_half_max_s"] = max(lags)
            wait_drained(a, b)
    return figures


def wait_drained(a: Site | ClusterSite, b: Site | ClusterSite) -> None:
    """Until neither site has anything to send: past the backlogs, `site verify` (wait_converged)
    digests tens of thousands of files on both sites, which only lengthens the run."""
    def pending(site: Site | ClusterSite) -> int:
        outbound = site.status()["outbound"]
        assert isinstance(outbound, dict)
        return int(outbound["pending_operations"])

    deadline = time.monotonic() + 600
    while pending(a) or pending(b):
        if time.monotonic() > deadline:
            raise TimeoutError("the sites did not drain in 600 s")
        time.sleep(0.2)


def load_average() -> float:
    """The machine's 1-minute load average (other work on the two cores skews every figure)."""
    return os.getloadavg()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay of the link")
    parser.add_argument("--creates", type=int, default=2000)
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--steady-creates", type=float, default=20.0, help="small files per second")
    parser.add_argument("--steady-mib", type=float, default=2.0, help="1 MiB files per second")
    parser.add_argument("--catch-up-files", type=int, default=2000)
    parser.add_argument("--catch-up-mib", type=int, default=64)
    parser.add_argument("--delta-mib", type=int, default=64, help="size of the file changed in places")
    parser.add_argument("--drain-files", type=int, default=10000, help="creates of the backlog drained")
    parser.add_argument("--drain-mib", type=int, default=128, help="1 MiB files of the backlog drained")
    parser.add_argument("--two-sided-files", type=int, default=4500,
                        help="files each site writes while cut off (two_sided: about 2.2 operations a file)")
    parser.add_argument("--size", default="8G", help="each site's image")
    parser.add_argument("--only", default="write,untar,rate,lag,catch_up,delta",
                        type=lambda text: set(text.split(",")), help="the figures to measure")
    parser.add_argument("--pushes-in-flight", default="", help="values of [site] pushes_in_flight to alternate "
                        "between runs, e.g. 1,8 (default: the daemon's)")
    parser.add_argument("--sources", default="", help="source trees (checkouts' roots) whose daemons to alternate "
                        "between runs, e.g. /tmp/old,. (default: this checkout's)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--members", type=int, default=1, help="nodes of site a (1: a single node, else a cluster)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("site_bench: needs root (loop devices, network namespaces, FUSE)", file=sys.stderr)
        return 2
    windows: list[int | None] = [int(w) for w in args.pushes_in_flight.split(",")] if args.pushes_in_flight else [None]
    sources: list[Path | None] = [Path(s).resolve() for s in args.sources.split(",")] if args.sources else [None]
    settings = [(window, source) for source in sources for window in windows]
    runs: dict[str, list[dict[str, float]]] = {}
    for run in range(args.runs):
        # alternating, in both orders: the machine's drift hits every setting alike
        for window, source in settings if run % 2 == 0 else list(reversed(settings)):
            with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="site-bench-") as tmp:
                figures = measure(args, Path(tmp), window, source)
                figures["load_average"] = load_average()
            label = " ".join(part for part in ("" if window is None else f"pushes_in_flight={window}",
                                               "" if source is None else f"source={source}") if part) or "default"
            runs.setdefault(label, []).append(figures)
            print(f"run {run + 1} ({label}): " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
    medians = {}
    for label, done in runs.items():
        medians[label] = {key: statistics.median(r[key] for r in done) for key in done[0]}
        print(f"\n{label}: medians of {len(done)} runs, link delay {args.delay_ms:g} ms one way:")
        for key, value in medians[label].items():
            spread = " / ".join(f"{r[key]:.3f}" for r in done)
            print(f"  {key:<26} {value:10.3f}   ({spread})")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
