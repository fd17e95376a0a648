"""Benchmark targets: ext4 on a loop device, the raw loop device, an AwsomeFS dev mount, and the
pyfuse3 floor (bench/nullfs.py, an in-memory filesystem on the same binding and mount options).

Each target is a context manager so that `fsbench.py` can stack them in one `ExitStack` and be sure
that loop devices are detached and mounts are gone even when a workload fails or the user presses
Ctrl-C halfway. Setup also clears leftovers of an earlier run that was killed hard (SIGKILL, power
loss), because a stale loop device over the same image would otherwise make `mkfs` fail or, worse,
let two block devices cache the same file.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

READY_PREFIX = "awsomefsd: mounted "


class TargetError(Exception):
    """A target could not be set up; the message says why, for the report."""


class TargetSkipped(TargetError):
    """A target's software is not installed: reported with how to install it, not a failure."""


@dataclass(frozen=True)
class Target:
    """Where a workload runs: `path` is a directory for filesystems and a device node for `raw`."""

    name: str
    path: Path
    is_block_device: bool = False
    pid: int | None = None
    """The process serving a FUSE target (its children too: read workers), for CPU accounting."""


def run(cmd: list[str], *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a helper command, capturing output so a failure can be reported in one line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise TargetError(f"{shlex.join(cmd)} failed ({proc.returncode}): {detail[-1] if detail else ''}")
    return proc


def parse_size(text: str) -> int:
    """Parse `4G`, `512M`, `64k` or plain bytes; binary units, as fio and truncate use them."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def is_mounted(path: Path) -> bool:
    """True if `path` is a mount point in /proc/mounts (works for dead FUSE mounts, unlike stat)."""
    want = str(path.resolve())
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == want:
                return True
    return False


def lazy_unmount(path: Path) -> None:
    """Detach a mount even if busy or its FUSE daemon is gone, so teardown never hangs."""
    if is_mounted(path):
        run(["umount", "-l", str(path)], check=False)


def detach_loops_for(image: Path) -> None:
    """Detach every loop device over `image` (leftovers of a killed run)."""
    if not image.exists():
        return
    out = run(["losetup", "-j", str(image)], check=False).stdout
    for line in out.splitlines():
        device = line.split(":", 1)[0].strip()
        if device:
            run(["losetup", "-d", device], check=False)


def cpu_seconds(*pids: int) -> float:
    """User and system CPU seconds of these processes so far, all their threads (one that has
    exited counts nothing)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    """Write back dirty data, then drop page, dentry and inode caches so the next phase starts cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextlib.contextmanager
def loop_device(image: Path, size_bytes: int) -> Iterator[Path]:
    """A fresh sparse image of `size_bytes` attached to a loop device with direct I/O.

    `--direct-io=on` makes the loop driver bypass the host page cache for the backing file, so the
    page cache of the filesystem under test is the only cache (as with a real disk, and as with
    AwsomeFS, which opens its image with O_DIRECT) and `drop_caches` really means cold reads.
    """
    detach_loops_for(image)
    image.unlink(missing_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size_bytes)
    device: Path | None = None
    try:
        out = run(["losetup", "--find", "--show", "--direct-io=on", str(image)]).stdout.strip()
        device = Path(out)
        yield device
    finally:
        if device is not None:
            run(["losetup", "-d", str(device)], check=False)
        detach_loops_for(image)
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def ext4_target(workdir: Path, size_bytes: int) -> Iterator[Target]:
    """ext4 with default mount options on its own loop device: the native baseline.

    Lazy inode-table and journal initialisation are turned off: otherwise `ext4lazyinit` writes in
    the background during the first minutes and steals bandwidth from the workloads.
    """
    mount = workdir / "mnt-ext4"
    lazy_unmount(mount)
    mount.mkdir(parents=True, exist_ok=True)
    with loop_device(workdir / "ext4.img", size_bytes) as device:
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(device)])
        run(["mount", "-t", "ext4", str(device), str(mount)])
        try:
            yield Target("ext4", mount)
        finally:
            if is_mounted(mount):
                run(["umount", str(mount)], check=False)
            lazy_unmount(mount)


@contextlib.contextmanager
def raw_target(workdir: Path, size_bytes: int) -> Iterator[Target]:
    """The bare loop device over a second image: the ceiling for fio seq/rand (direct=1 only)."""
    with loop_device(workdir / "raw.img", size_bytes) as device:
        yield Target("raw", device, is_block_device=True)


@dataclass
class Daemon:
    """A running `awsomefsd dev` process and where its output goes."""

    proc: subprocess.Popen[bytes]
    mount: Path
    log: Path


def _spawn(argv: list[str], mount: Path, log: Path, env: dict[str, str] | None = None) -> Daemon:
    """Start a FUSE daemon in its own session with its output in `log`.

    Its own session, so a Ctrl-C in the terminal reaches only the harness, which then stops
    workloads first and the daemon last instead of racing the daemon's unmount; a log file rather
    than a pipe, so a chatty daemon can never block on a full pipe.
    """
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=None if env is None else {**os.environ, **env})
        except OSError as err:
            raise TargetError(f"cannot run {shlex.join(argv)}: {err}") from err
    return Daemon(proc, mount, log)


def _log_tail(log: Path, lines: int = 2) -> str:
    """The last lines of the daemon log (usually the exception), to say why it did not come up."""
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        text = []
    tail = " | ".join(line.strip() for line in text[-lines:])
    return f"{tail} (log: {log})" if tail else f"no output (log: {log})"


def _wait_ready(daemon: Daemon, deadline_s: float, ready_prefix: str = READY_PREFIX) -> None:
    """Poll the log for the ready line; fail on exit, on timeout, or if the mount is missing."""
    want = ready_prefix + str(daemon.mount)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        text = daemon.log.read_text(errors="replace") if daemon.log.exists() else ""
        if any(line.strip() == want for line in text.splitlines()):
            if not is_mounted(daemon.mount):
                raise TargetError(f"awsomefsd printed ready but {daemon.mount} is not in /proc/mounts")
            return
        code = daemon.proc.poll()
        if code is not None:
            raise TargetError(f"awsomefsd exited with status {code} before ready: {_log_tail(daemon.log)}")
        time.sleep(0.1)
    raise TargetError(f"awsomefsd not ready after {deadline_s:.0f}s: {_log_tail(daemon.log)}")


def _stop_daemon(daemon: Daemon, grace_s: float = 30) -> None:
    """SIGINT (clean unmount per the contract), then SIGKILL; a leftover mount is lazily detached."""
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGINT)
        try:
            daemon.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait(timeout=10)
    lazy_unmount(daemon.mount)


@contextlib.contextmanager
def awsomefs_target(workdir: Path, size: str, command: list[str], deadline_s: float, *,
                    transport: str = "kernel", settings: dict[str, str] | None = None) -> Iterator[Target]:
    """Start `awsomefsd dev` on a fresh state dir and yield its mount once it printed the ready line.
    `transport`: how it serves FUSE ([mount] transport); the target is named "awsomefs" for the
    default one and "awsomefs-<transport>" for another. `settings`: more `AWSOMEFS_*` variables
    (a bench comparing read workers or io_uring on and off)."""
    name = "awsomefs" if transport == "kernel" else f"awsomefs-{transport}"
    mount = workdir / f"mnt-{name}"
    state = workdir / f"{name}-state"
    lazy_unmount(mount)
    detach_loops_for(state / "device.img")
    run(["rm", "-rf", str(state)], check=False)
    mount.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True)
    # Any free metrics port: the default (9337) may be held by another daemon on this machine.
    argv = [*command, "dev", "--mount", str(mount), "--state", str(state), "--size", size, "--metrics-port", "0"]
    daemon = _spawn(argv, mount, workdir / f"{name}.log", env={"AWSOMEFS_MOUNT__TRANSPORT": transport, **(settings or {})})
    try:
        _wait_ready(daemon, deadline_s)
        yield Target(name, mount, pid=daemon.proc.pid)
    finally:
        _stop_daemon(daemon)
        run(["rm", "-rf", str(state)], check=False)


FLOORS = {
    "fusefloor": (Path(__file__).with_name("nullfs.py"), "nullfs: mounted "),
    "kernelfloor": (Path(__file__).with_name("kernelfloor.py"), "kernelfloor: mounted "),
}


@contextlib.contextmanager
def floor_target(name: str, workdir: Path, python: str, deadline_s: float, *,
                 settings: dict[str, str] | None = None) -> Iterator[Target]:
    """A do-nothing filesystem: what a FUSE transport alone allows, request for request, on this
    machine and load. `fusefloor` is pyfuse3's (bench/nullfs.py), `kernelfloor` our own
    transport's (bench/kernelfloor.py, the default transport's handlers and session).

    A ceiling, not a competitor: it keeps everything in memory and checks nothing, so AwsomeFS at
    this target's figure would mean the transport is the bottleneck, and a figure above it is
    impossible without a different one. `settings`: `AWSOMEFS_*` variables the floor reads too
    (kernelfloor: `AWSOMEFS_MOUNT__IO_URING`).
    """
    script, ready = FLOORS[name]
    mount = workdir / f"mnt-{name}"
    lazy_unmount(mount)
    mount.mkdir(parents=True, exist_ok=True)
    daemon = _spawn([python, str(script), str(mount)], mount, workdir / f"{name}.log", env=settings)
    try:
        _wait_ready(daemon, deadline_s, ready)
        yield Target(name, mount, pid=daemon.proc.pid)
    finally:
        _stop_daemon(daemon)
