"""A real systemd of the test's own: PID 1 of a new PID and mount namespace, with only the units
a test gives it.

systemd is not PID 1 on these machines, but its binary is installed (Debian's `systemd`
package), and it runs as a container's init: `container=` in its environment, a private /run,
and the unit directories hidden under empty tmpfs mounts so that none of the machine's own
units start. The test's units go into /etc/systemd/system inside. Its mounts (a FUSE mount
made by a service included) exist only in that namespace. Processes that use them enter it
(`prefix`), and the test reads files through `/proc/PID/root` (`path`).

The manager and its services live in a cgroup of their own, made for it in the `name=systemd`
and unified hierarchies, so they stay out of the machine's; `close` kills the namespace's init,
which ends every process in it, and removes those cgroups.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.support.daemon import wait_for

SYSTEMD = Path("/lib/systemd/systemd")
BOOT_DEADLINE_S = 60.0
COMMAND_TIMEOUT_S = 120.0
CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
TARGET = "awsomefs-test.target"
# A service's default dependencies name these; the machine's own are hidden.
MINIMAL_TARGETS = ("sysinit.target", "basic.target", "shutdown.target", TARGET)

BOOT_SCRIPT = """\
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /etc/systemd/system
mount -t tmpfs tmpfs /lib/systemd/system
cp -r "$1"/. /etc/systemd/system/
exec env container=awsomefs-test {systemd} --system --unit={target} --log-target=console --log-level=warning
"""


def available() -> str | None:
    """None when a private systemd can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs unshare and nsenter (util-linux)"
    if not all(h.is_dir() for h in CGROUP_HIERARCHIES):
        return "needs the name=systemd and unified cgroup hierarchies"
    return None


class PrivateSystemd:
    """See the module docstring. `units`: a directory of unit files (drop-in directories too)."""

    def __init__(self, base: Path, units: Path) -> None:
        self.base = base
        self.cgroup = f"awsomefs-test-{os.getpid()}-{id(self)}"
        for hierarchy in CGROUP_HIERARCHIES:
            (hierarchy / self.cgroup).mkdir()
        self.log = open(base / "systemd.log", "w")  # noqa: SIM115 - closed in close()
        boot = base / "boot.sh"
        boot.write_text(BOOT_SCRIPT.format(systemd=SYSTEMD, target=TARGET))
        for target in MINIMAL_TARGETS:
            if not (units / target).exists():
                (units / target).write_text(f"[Unit]\nDescription={target} (test)\nDefaultDependencies=no\n")
        self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "sh", str(boot), str(units)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd="/",
                                     preexec_fn=self._enter_cgroup)
        try:
            wait_for(self._init_pid_known, 10, "unshare to start the namespace's init")
            wait_for(self._running, BOOT_DEADLINE_S, "the private systemd to finish booting", interval_s=0.1)
        except BaseException:
            self.close()
            raise

    def _enter_cgroup(self) -> None:
        for hierarchy in CGROUP_HIERARCHIES:
            (hierarchy / self.cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def _init_pid_known(self) -> bool:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            text = children.read_text().split()
        except FileNotFoundError:
            raise AssertionError(f"unshare exited: {self.output()}") from None
        if not text:
            return False
        self.pid = int(text[0])
        return True

    def _running(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the private systemd exited: {self.output()}")
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    @property
    def prefix(self) -> list[str]:
        """Run a command inside the namespaces (its mounts, its systemd's socket)."""
        return ["nsenter", "-t", str(self.pid), "-m", "-p"]

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.prefix, *command], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              cwd="/", check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def path(self, inside: Path) -> Path:
        """`inside` (absolute) as seen from the namespace's mounts."""
        return Path(f"/proc/{self.pid}/root") / inside.relative_to("/")

    def mounted(self, mountpoint: Path) -> bool:
        mounts = self.run("cat", "/proc/self/mountinfo").stdout
        return any(line.split()[4] == str(mountpoint) for line in mounts.splitlines())

    def output(self) -> str:
        self.log.flush()
        return (self.base / "systemd.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        """Kill the namespace's init (and with it every process in it), then remove its cgroups."""
        if self.proc.poll() is None:
            pid = getattr(self, "pid", None)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
        self.proc.wait(60)
        self.log.close()
        for hierarchy in CGROUP_HIERARCHIES:
            root = hierarchy / self.cgroup
            wait_for(functools.partial(_remove_tree, root), 30, f"the processes in {root} to end")


def _remove_tree(root: Path) -> bool:
    """rmdir `root` and its sub-cgroups, deepest first; False while a process still lives in one."""
    if not root.exists():
        return True
    directories = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    try:
        for directory in [*directories, root]:
            directory.rmdir()
    except OSError:
        return False
    return True
