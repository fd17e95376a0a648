#!/usr/bin/env python3
"""How long applications stall while awsomefsd is replaced under them (issue 14, 41: target < 1 s).

Starts a descriptor keeper and `awsomefsd dev` on a fresh image and puts a load on the mount: a
writer doing 4 KiB writes each followed by an fsync, and a reader doing 4 KiB direct reads at
random offsets of a file, each through a descriptor opened at the start and each recording every
operation's latency. Then it replaces the daemon `--rounds` times by hand-over (SIGUSR2, then a
new daemon once the old one exited, as `systemctl reload` does) and `--rounds` times by crash
(SIGKILL, then a new daemon). With `--take-over` a hand-over starts the next daemon first
(`awsomefsd dev --take-over`: it loads its code, then sends the SIGUSR2 itself). For each
replacement: the longest single operation either process saw (the stall), and where the time
went, from the daemons' logs: (successor started ->) signal -> requests drained -> durable ->
descriptor let go -> old process exited -> new process started -> its code loaded -> (its lock
taken ->) its storage open -> mount continued -> serving (its "mounted" line) -> the first
operation of the load answered after that. The bytes themselves are checked by
tests/mounted/test_restart.py. `--no-raise` starts each daemon without CAP_SYS_NICE, so it
cannot run its start ahead of the load (awsomefsd/priority.py): to measure what that gains.

With `--systemd`, the daemon runs as the packaged unit under a real systemd of the benchmark's
own (tests/support/systemd.py; from the checkout, or the binary `--awsomefsd` names) and is
replaced the ways an operator does it: `systemctl restart`, `systemctl reload` (a package
upgrade) and a SIGKILL that systemd restarts, in turn, `--rounds` times each (a writer only).

The daemons load their code from bytecode compiled before the first round, as an installed
system does: with PYTHONDONTWRITEBYTECODE set (as in some shells and CI), every start compiled the
package's 110 modules again, 0.3 s of CPU that no installed daemon spends.

As root (from another user: sudo in front), from the repository root:

    .venv/bin/python bench/restart_bench.py --rounds 10 [--take-over] [--no-raise]
    .venv/bin/python bench/restart_bench.py --rounds 5 --systemd [--awsomefsd dist/awsomefsd]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

AWSOMEFSD = [sys.executable, "-m", "awsomefsd"]
WRITER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
os.fsync(fd)
os.fsync(os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY))
n = 0
while not os.path.exists(sys.argv[2]):
    start = time.monotonic()
    os.write(fd, b"%08d\n" % n)
    took = time.monotonic() - start
    print(f"{start:.6f} {took:.6f}", flush=True)
    n += 1
    time.sleep(0.002)
os.fsync(fd)
print("done", n, flush=True)
"""


READER = r"""
import mmap, os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
blocks = os.fstat(fd).st_size // 4096
buf = mmap.mmap(-1, 4096)
while not os.path.exists(sys.argv[2]):
    start = time.monotonic()
    os.preadv(fd, [buf], random.randrange(blocks) * 4096)
    took = time.monotonic() - start
    print(f"{start:.6f} {took:.6f}", flush=True)
    time.sleep(0.002)
print("done", flush=True)
"""
SYNCING_WRITER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
os.fsync(fd)
os.fsync(os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY))
block = b"w" * 4096
while not os.path.exists(sys.argv[2]):
    start = time.monotonic()
    os.write(fd, block)
    os.fsync(fd)
    took = time.monotonic() - start
    print(f"{start:.6f} {took:.6f}", flush=True)
    time.sleep(0.002)
print("done", flush=True)
"""


@dataclass
class Started:
    proc: subprocess.Popen[str]
    log: Path
    spawned: float
    """time.time() just before the process was started"""
    spawned_mono: float
    """the same moment on time.monotonic(), the load's clock"""
    ready: float
    """time.time() when it printed that it serves the mount"""
    cpu_s: float = 0.0
    """CPU time (user + system) the process had used by then: what the start costs whatever the
    machine's load, which multiplies the wall time"""


def start_daemon(base: Path, env: dict[str, str], serial: int = 0, *, take_over: bool = False,
                 prefix: tuple[str, ...] = ()) -> Started:
    log = base / f"daemon-{serial}.log"
    spawned, spawned_mono = time.time(), time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen([*prefix, *AWSOMEFSD, "dev", "--state", str(base / "state"), "--mount",
                                 str(base / "mnt"), "--size", "2G", "--metrics-port", "-1",
                                 *(["--take-over"] if take_over else [])], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env, cwd="/", start_new_session=True)  # as a service
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.startswith("awsomefsd: mounted"):
            return Started(proc, log, spawned, spawned_mono, time.time(), _cpu_s(proc.pid))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("restart_bench: the daemon did not mount")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Events = list[tuple[str, float, float]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="hand-overs, then as many crashes (default 10)")
    p.add_argument("--settle-s", type=float, default=1.0, help="writing between replacements (default 1 s)")
    p.add_argument("--systemd", action="store_true", help="the packaged unit under a real systemd")
    p.add_argument("--awsomefsd", type=Path, help="with --systemd: this binary instead of the checkout")
    p.add_argument("--take-over", action="store_true", help="hand over by starting the next daemon first")
    p.add_argument("--no-raise", action="store_true", help="start daemons without CAP_SYS_NICE")
    args = p.parse_args()
    compile_package()
    base = Path(tempfile.mkdtemp(prefix="awsomefs-restart-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        if args.systemd:
            binary = None if args.awsomefsd is None else args.awsomefsd.resolve()  # ExecStart= wants it absolute
            report(base, under_systemd(base, args.rounds, args.settle_s, binary), ("restart", "reload", "crash"))
        else:
            prefix = ("setpriv", "--bounding-set", "-sys_nice") if args.no_raise else ()
            report_keeper(base, with_keeper(base, args.rounds, args.settle_s, take_over=args.take_over, prefix=prefix))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


REPO = Path(__file__).resolve().parents[1]


def compile_package() -> None:
    """Bytecode for every module of the package, beside it (__pycache__, ignored by git)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the daemons started from here write theirs too
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "awsomefsd")], check=True,
                   stdout=subprocess.DEVNULL)


def under_systemd(base: Path, rounds: int, settle_s: float, binary: Path | None) -> Events:
    """systemctl restart, systemctl reload and a SIGKILL, in turn, `rounds` times each."""
    sys.path.insert(0, str(REPO))
    from tests.packaging.test_systemd_service import install_service
    from tests.support.systemd import PrivateSystemd, available

    unavailable = available()
    if unavailable is not None:
        raise SystemExit(f"restart_bench: a private systemd cannot run here: {unavailable}")
    units = install_service(binary, base)
    sd = PrivateSystemd(base, units)
    events: Events = []
    try:
        sd.systemctl("start", "awsomefsd.service")
        stop_flag = base / "stop-writing"
        sd.path(base / "mnt" / "w").mkdir()
        with open(base / "writer.out", "w") as out:
            writer = subprocess.Popen([*sd.prefix, sys.executable, "-c", WRITER, str(base / "mnt" / "w" / "log"),
                                       str(stop_flag)], stdout=out, stderr=subprocess.STDOUT, cwd="/")
        time.sleep(settle_s)
        for kind in ["restart", "reload", "crash"] * rounds:
            before = sd.show("awsomefsd.service", "MainPID")["MainPID"]
            began = time.monotonic()
            if kind == "crash":
                sd.run("kill", "-KILL", before)
            else:
                sd.systemctl(kind, "awsomefsd.service")
            deadline = time.monotonic() + 60
            while not _replaced(sd.show("awsomefsd.service", "MainPID", "ActiveState"), before):
                if time.monotonic() > deadline:
                    raise SystemExit(f"restart_bench: no daemon 60 s after {kind}")
                time.sleep(0.01)
            events.append((kind, began, time.monotonic()))
            time.sleep(settle_s)
        stop_flag.write_text("")
        writer.wait(60)
        sd.systemctl("stop", "awsomefsd.service")
    finally:
        sd.close()
    return events


def _replaced(state: dict[str, str], before: str) -> bool:
    return state["ActiveState"] == "active" and state["MainPID"] not in ("0", before)


@dataclass
class Replacement:
    """One replacement of the daemon, with its own clock readings (time.time(); `began_mono` and
    `ended_mono` on the load's clock, time.monotonic())."""

    kind: str
    began: float
    began_mono: float
    exited: float
    old_log: Path
    new: Started
    ended_mono: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """phase -> ms after the signal"""


PHASES = {  # a line in the old daemon's log -> the phase it ends
    "received SIGUSR2": "signal received",
    "FUSE session: stopped reading": "requests drained",
    "is durable": "synced",
    "handed the mount": "descriptor let go",
}


def with_keeper(base: Path, rounds: int, settle_s: float, *, take_over: bool = False,
                prefix: tuple[str, ...] = ()) -> list[Replacement]:
    """SIGUSR2 and a new daemon (or a new daemon that takes over) `rounds` times, then SIGKILL and a
    new daemon as often."""
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "AWSOMEFS_MOUNT__FD_KEEPER": str(base / "keeper.sock")}
    keeper = subprocess.Popen([*AWSOMEFSD, "fd-keeper", "--socket", str(base / "keeper.sock")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd="/")
    assert keeper.stdout is not None
    keeper.stdout.readline()
    daemon = start_daemon(base, env, prefix=prefix)
    stop_flag = base / "stop-writing"
    work = base / "mnt" / "w"
    work.mkdir()
    with open(work / "read-me", "wb") as fh:
        fh.write(os.urandom(8 << 20))
        os.fsync(fh.fileno())
    load = []
    for name, script, target in (("writer", SYNCING_WRITER, work / "log"), ("reader", READER, work / "read-me")):
        with open(base / f"{name}.out", "w") as out:  # the child keeps its own copy
            load.append(subprocess.Popen([sys.executable, "-c", script, str(target), str(stop_flag)],
                                         stdout=out, stderr=subprocess.STDOUT, cwd="/"))
    done: list[Replacement] = []
    try:
        time.sleep(settle_s)
        for serial, kind in enumerate(["hand-over"] * rounds + ["crash"] * rounds, start=1):
            began, began_mono = time.time(), time.monotonic()
            old = daemon
            if kind == "hand-over" and take_over:
                daemon = start_daemon(base, env, serial, take_over=True, prefix=prefix)
                assert _exit_status(old.proc) == 75, "the daemon did not hand over"
                exited = _exited(old)
                began = _signalled(old.log) or began  # the successor sent it once loaded
                began_mono = daemon.spawned_mono + (began - daemon.spawned)
            else:
                if kind == "hand-over":
                    old.proc.send_signal(signal.SIGUSR2)
                    assert _exit_status(old.proc) == 75, "the daemon did not hand over"
                else:
                    old.proc.kill()
                    _exit_status(old.proc)
                exited = time.time()
                daemon = start_daemon(base, env, serial, prefix=prefix)
            done.append(Replacement(kind, began, began_mono, exited, old.log, daemon, time.monotonic()))
            time.sleep(settle_s)
        stop_flag.write_text("")
        for proc in load:
            proc.wait(60)
    finally:
        for proc in load:
            if proc.poll() is None:
                proc.kill()
        daemon.proc.send_signal(signal.SIGINT)
        daemon.proc.wait(60)
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(10)
    loads = [samples(base / f"{name}.out") for name in ("writer", "reader")]
    for replacement in done:
        replacement.phases = phases(replacement, [op for found in loads for op in found])
    return done


def _exit_status(proc: subprocess.Popen[str]) -> int:
    """Wait for the process to exit, woken by its exit (Popen.wait with a timeout polls, up to
    50 ms late), killing it after 60 s."""
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        return proc.wait()
    finally:
        watchdog.cancel()


def _signalled(log: Path) -> float | None:
    """When the old daemon received the successor's SIGUSR2 (its log's clock)."""
    for line in log.read_text().splitlines():
        if "received SIGUSR2" in line:
            return _logged_at(line)
    return None


def _exited(old: Started) -> float:
    """When the old daemon ended: its log's last line (it exits right after), else now."""
    last = [when for when in map(_logged_at, old.log.read_text().splitlines()) if when is not None]
    return max(last) if last else time.time()


def _logged_at(line: str) -> float | None:
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def phases(r: Replacement, ops: list[tuple[float, float]]) -> dict[str, float]:
    """Where the time of one replacement went: each phase's end, in ms after the signal (a
    successor's start, before it, is negative). `ops`: the load's (start, seconds), on the
    monotonic clock."""
    at: dict[str, float] = {}
    if r.kind == "hand-over":
        for line in r.old_log.read_text().splitlines():
            for marker, phase in PHASES.items():
                when = _logged_at(line)
                if marker in line and when is not None and phase not in at:
                    at[phase] = when
    at["old process exited"] = r.exited
    at["new process started"] = r.new.spawned
    for line in r.new.log.read_text().splitlines():
        when = _logged_at(line)
        if when is None:
            continue
        if "started: the daemon's code loaded" in line:
            loaded_ms = float(line.split("code loaded ")[1].split()[0])
            at["code loaded"] = r.new.spawned + loaded_ms / 1000
            at["storage open"] = when
        elif "continuing the mount" in line:
            at["mount continued"] = when
        elif "taking over from pid" in line:
            at["lock taken"] = when
    at["serving"] = r.new.ready
    continued = at.get("mount continued", r.new.ready)
    to_mono = r.new.spawned_mono - r.new.spawned
    answered = [start + took for start, took in ops if start + took >= continued + to_mono]
    if answered:
        at["first op answered"] = min(answered) - to_mono
    return {phase: (when - r.began) * 1000 for phase, when in at.items()}


def samples(path: Path) -> list[tuple[float, float]]:
    """(start, seconds) of each operation a load process recorded."""
    found = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] != "done":
            found.append((float(fields[0]), float(fields[1])))
    return found


def report_keeper(base: Path, done: list[Replacement]) -> None:
    """Per kind: the stall (the longest operation of the writer or the reader around each
    replacement), median and max; the median of each phase's end; each load's typical operation."""
    loads = {name: samples(base / f"{name}.out") for name in ("writer", "reader")}
    ops = sum(len(found) for found in loads.values())
    print(f"restart_bench: {ops} operations (4 KiB write + fsync; 4 KiB direct read); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for kind in ("hand-over", "crash"):
        rounds = [r for r in done if r.kind == kind]
        if not rounds:
            continue
        stalls = [max((took for found in loads.values() for start, took in found
                       if r.began_mono - 1 <= start <= r.ended_mono), default=0.0) for r in rounds]
        print(f"  {kind}: stall median {statistics.median(stalls):.3f} s, max {max(stalls):.3f} s "
              f"({' '.join(f'{w:.3f}' for w in stalls)})")
        order = sorted({p for r in rounds for p in r.phases}, key=lambda p: statistics.median(
            r.phases[p] for r in rounds if p in r.phases))
        for phase in order:
            values = [r.phases[phase] for r in rounds if phase in r.phases]
            print(f"    {phase:22s} at {statistics.median(values):7.0f} ms (max {max(values):.0f})")
        cpu = [r.new.cpu_s for r in rounds]
        print(f"    the new daemon's CPU until serving: median {statistics.median(cpu):.2f} s (max {max(cpu):.2f})")
    for name, found in loads.items():
        if found:
            print(f"  a {name}'s operation otherwise: median {statistics.median(t for _, t in found) * 1e6:.0f} us")


def report(base: Path, events: Events, kinds: tuple[str, ...]) -> None:
    """The longest write the writer saw around each replacement, per kind."""
    samples = []
    for line in (base / "writer.out").read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] != "done":
            samples.append((float(fields[0]), float(fields[1])))
    print(f"restart_bench: {len(samples)} writes; longest write during each replacement (s):")
    for kind in kinds:
        worst = [max((took for start, took in samples if began - 1 <= start <= ended), default=0.0)
                 for k, began, ended in events if k == kind]
        print(f"  {kind:9s} median {statistics.median(worst):.3f}  max {max(worst):.3f}  "
              f"({' '.join(f'{w:.3f}' for w in worst)})")
    typical = statistics.median(took for _, took in samples)
    print(f"  a write otherwise: median {typical * 1e6:.0f} us")


if __name__ == "__main__":
    sys.exit(main())
