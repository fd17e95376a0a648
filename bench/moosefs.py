"""MooseFS 3.0 as a benchmark target: the competitor AwsomeFS is measured against (issue 40).

One master and one chunkserver (goal 1) from Debian's moosefs-master, moosefs-chunkserver and
moosefs-client packages, with:

- a network namespace of their own, the master and chunkserver bound to a private address on its
  loopback: no route from the root namespace, so no bench traffic can leave the machine (DESIGN.md
  §10). Every MooseFS process, mfsmount included, enters only that network namespace
  (`nsenter --net`, not `ip netns exec`, which would also give it a mount namespace of its own and
  hide the FUSE mount): the mount appears in the root mount namespace, where the workloads run
  like on any other target;
- the chunkserver's data on ext4 over a loop device of the same size as the other targets' images;
- config files generated into the work dir, never /etc; no service of the packages is used.

Setup first removes what a killed earlier run over the same work dir left (processes in the
namespace, mounts, the namespace, loop devices); teardown does the same, also on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from targets import (
    Daemon,
    Target,
    TargetError,
    TargetSkipped,
    _log_tail,
    _spawn,
    is_mounted,
    lazy_unmount,
    loop_device,
    run,
)

ADDRESS = "10.213.0.1"  # the master's and chunkserver's address, on the namespace's loopback only
PORTS = {"MATOML": 9419, "MATOCS": 9420, "MATOCL": 9421, "CSSERV": 9422}  # inside the namespace only
TOOLS = ("mfsmaster", "mfschunkserver", "mfsmount", "mfssetgoal", "mfssettrashtime", "nsenter", "ip", "ss")
INSTALL_HINT = "apt-get install moosefs-master moosefs-chunkserver moosefs-client (scripts/install.sh test does)"
EMPTY_METADATA = Path("/var/lib/mfs/metadata.mfs.empty")


def missing_tools() -> list[str]:
    """The MooseFS programs (and namespace tools) not on PATH; empty when the target can run."""
    return [tool for tool in TOOLS if not shutil.which(tool)]


def netns_name(workdir: Path) -> str:
    """One namespace name per work dir, so a later run finds and removes a killed run's leftovers
    (and two work dirs never share one)."""
    return "fsbench-mfs-" + hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:8]


def config_files(root: Path, hdd: Path, user: str) -> dict[str, str]:
    """The text of every config file, by name: master, exports, chunkserver, its disk list.

    Paths are absolute and inside `root`; the master and the chunkserver listen on ADDRESS only.
    Every MooseFS process runs at nice 0, as our daemon does by default: its own default, -19,
    would favour it on a loaded machine (NICE_LEVEL here, `-o mfsnice=0` on the mount).
    Trash time 0 is set on the mount later (mfssettrashtime), so deleted files free their chunks
    as on the other targets instead of staying a day in the trash.
    """
    master = {
        "WORKING_USER": user,
        "WORKING_GROUP": user,
        "SYSLOG_IDENT": "fsbench-mfsmaster",
        "DATA_PATH": str(root / "master"),
        "EXPORTS_FILENAME": str(root / "mfsexports.cfg"),
        "TOPOLOGY_FILENAME": str(root / "mfstopology.cfg"),
        "MATOML_LISTEN_HOST": ADDRESS,
        "MATOML_LISTEN_PORT": str(PORTS["MATOML"]),
        "MATOCS_LISTEN_HOST": ADDRESS,
        "MATOCS_LISTEN_PORT": str(PORTS["MATOCS"]),
        "MATOCL_LISTEN_HOST": ADDRESS,
        "MATOCL_LISTEN_PORT": str(PORTS["MATOCL"]),
        "NICE_LEVEL": "0",
    }
    chunkserver = {
        "WORKING_USER": user,
        "WORKING_GROUP": user,
        "SYSLOG_IDENT": "fsbench-mfschunkserver",
        "DATA_PATH": str(root / "chunkserver"),
        "HDD_CONF_FILENAME": str(root / "mfshdd.cfg"),
        "MASTER_HOST": ADDRESS,
        "MASTER_PORT": str(PORTS["MATOCS"]),
        "BIND_HOST": ADDRESS,
        "CSSERV_LISTEN_HOST": ADDRESS,
        "CSSERV_LISTEN_PORT": str(PORTS["CSSERV"]),
        "NICE_LEVEL": "0",
    }

    def cfg(values: dict[str, str]) -> str:
        return "".join(f"{key} = {value}\n" for key, value in values.items())

    return {
        "mfsmaster.cfg": cfg(master),
        "mfsexports.cfg": f"{ADDRESS} / rw,alldirs,maproot=0\n",
        "mfstopology.cfg": "",
        "mfschunkserver.cfg": cfg(chunkserver),
        "mfshdd.cfg": f"{hdd}\n",
    }


def _nsenter(netns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"]


def _netns_exists(netns: str) -> bool:
    return Path("/run/netns", netns).exists()


def _kill_netns_processes(netns: str, grace_s: float = 20) -> None:
    """SIGTERM every process in the namespace, wait, then SIGKILL: the master writes its metadata
    on SIGTERM, and a process left behind would keep the namespace and its ports alive."""
    if not _netns_exists(netns):
        return
    end = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        pids = [int(p) for p in run(["ip", "netns", "pids", netns], check=False).stdout.split()]
        if not pids:
            return
        if time.monotonic() > end:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.2)


def _clear_leftovers(workdir: Path, netns: str) -> None:
    """What a killed run over this work dir left: mount, processes, namespace, data fs."""
    lazy_unmount(workdir / "mnt-moosefs")
    _kill_netns_processes(netns)
    if _netns_exists(netns):
        run(["ip", "netns", "delete", netns], check=False)
    lazy_unmount(workdir / "moosefs" / "hdd")


def _wait_for(what: str, ready: Callable[[], bool], daemons: list[Daemon], deadline_s: float) -> None:
    """Poll `ready()` until true; fail at once (with its log) if a MooseFS process exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if ready():
            return
        for daemon in daemons:
            code = daemon.proc.poll()
            if code is not None:
                raise TargetError(f"{daemon.log.stem.removeprefix('moosefs-')} exited with status {code}: {_log_tail(daemon.log)}")
        time.sleep(0.2)
    raise TargetError(f"MooseFS: {what} not within {deadline_s:.0f}s: {_log_tail(daemons[-1].log)}")


def _listening(netns: str, port: int) -> bool:
    """A TCP socket listens on `port` inside the namespace (the master is ready for clients)."""
    out = run(["nsenter", f"--net=/run/netns/{netns}", "ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def _has_space(mount: Path) -> bool:
    """The chunkserver registered its disk: the mount reports a capacity (0 before)."""
    try:
        return is_mounted(mount) and os.statvfs(mount).f_blocks > 0
    except OSError:
        return False


def _reap(daemons: list[Daemon]) -> None:
    """Collect the exit status of our children (stopped with the namespace), leaving no zombies."""
    for daemon in daemons:
        try:
            daemon.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait(timeout=10)


@contextlib.contextmanager
def _network(netns: str) -> Iterator[None]:
    """The private namespace: loopback up, ADDRESS on it, no other interface, no route out."""
    run(["ip", "netns", "add", netns])
    try:
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        run(["ip", "-n", netns, "addr", "add", f"{ADDRESS}/32", "dev", "lo"])
        yield
    finally:
        _kill_netns_processes(netns)
        run(["ip", "netns", "delete", netns], check=False)


@contextlib.contextmanager
def moosefs_target(workdir: Path, size_bytes: int, deadline_s: float) -> Iterator[Target]:
    """Master, chunkserver (goal 1) and mfsmount; yields the mount once it has capacity."""
    if missing := missing_tools():
        raise TargetSkipped(f"MooseFS not installed (no {', '.join(missing)}): {INSTALL_HINT}")
    # As root: the packages' `mfs` user may not reach a work dir in a private (0700) directory
    # such as mkdtemp's; the namespace, not the user, is what confines these daemons.
    user = "root"
    netns = netns_name(workdir)
    root = workdir / "moosefs"
    hdd = root / "hdd"
    mount = workdir / "mnt-moosefs"
    _clear_leftovers(workdir, netns)
    run(["rm", "-rf", str(root)], check=False)
    for directory in (root / "master", root / "chunkserver", hdd, mount):
        directory.mkdir(parents=True, exist_ok=True)
    for name, text in config_files(root, hdd, user).items():
        (root / name).write_text(text)
    shutil.copyfile(EMPTY_METADATA, root / "master" / "metadata.mfs")
    daemons: list[Daemon] = []
    with contextlib.ExitStack() as stack:
        stack.callback(run, ["rm", "-rf", str(root)], check=False)
        device = stack.enter_context(loop_device(workdir / "moosefs.img", size_bytes))
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(device)])
        run(["mount", "-t", "ext4", str(device), str(hdd)])
        stack.callback(lazy_unmount, hdd)
        stack.callback(_reap, daemons)  # after the namespace's processes were stopped
        stack.enter_context(_network(netns))
        stack.callback(lazy_unmount, mount)  # runs before the namespace's processes are stopped
        ns = _nsenter(netns)
        for program, cfg in (("mfsmaster", "mfsmaster.cfg"), ("mfschunkserver", "mfschunkserver.cfg")):
            argv = [*ns, program, "-f", "-c", str(root / cfg), "start"]
            daemons.append(_spawn(argv, mount, root.parent / f"moosefs-{program}.log"))
        _wait_for("master listening", lambda: _listening(netns, PORTS["MATOCL"]), daemons, deadline_s)
        mount_argv = [*ns, "mfsmount", "-f", "-H", ADDRESS, "-P", str(PORTS["MATOCL"]), "-S", "/", "-o", "mfsnice=0", str(mount)]
        daemons.append(_spawn(mount_argv, mount, root.parent / "moosefs-mfsmount.log"))
        _wait_for("mount with the chunkserver's capacity", lambda: _has_space(mount), daemons, deadline_s)
        # The tools reach the master directly (its address is in the mount's .masterinfo), so
        # they run in the namespace as well.
        run([*ns, "mfssetgoal", "-r", "1", str(mount)])
        run([*ns, "mfssettrashtime", "-r", "0", str(mount)])
        yield Target("moosefs", mount)
