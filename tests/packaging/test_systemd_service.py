"""The packaged unit under a real systemd: what an operator does to a running node.

`systemctl restart`, `systemctl reload` (a package upgrade) and a crash that systemd restarts
must not unmount anything; a reload hands over to a successor started first, and one that cannot
start leaves the daemon serving. A writer and a reader with descriptors opened before, and a shell
whose working directory is in the mount, keep working, and every byte the writer was told is
written is there, also after many of them in a row. `systemctl stop` unmounts and empties the
descriptor store; the next start mounts afresh and finds every byte. A daemon that keeps
crashing is given up on.

systemd runs as PID 1 of namespaces of the test's own (tests/support/systemd.py), with the unit
from packaging/ and a drop-in that points it at the daemon under test: the checkout here, the
compiled binary in the slow build test (tests/packaging/test_packaging.py), with the same
checks (`check_service`).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd import sdrestart
from tests.support import systemd
from tests.support.apps import Reader, expected, shell_run, start_shell, start_writer
from tests.support.daemon import AWSOMEFSD, REPO, wait_for

UNIT = REPO / "packaging" / "systemd" / "awsomefsd.service"
SERVICE = "awsomefsd.service"
WRITER_LINES = 1200  # ~7 s: long enough to span a restart and a reload

DROP_IN = """\
[Service]
ExecStart=
ExecStart={exe} run --config {config}
ExecReload=
ExecReload={exe} hand-over --config {config}
# The state and configuration live in the test's directory, not in /var/lib and /etc.
StateDirectory=
ConfigurationDirectory=
StandardOutput=append:{log}
StandardError=append:{log}
"""

CONFIG = """\
[node]
state_dir = "{base}/state"
[device]
path = "{base}/device.img"
[mount]
path = "{base}/mnt"
[metrics]
enabled = false
"""


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="awsomefs-systemd-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def checkout_command(base: Path) -> Path:
    """A script that runs the daemon from this checkout, as a unit's ExecStart= names a binary."""
    script = base / "awsomefsd"
    script.write_text(f"#!/bin/sh\nexec env PYTHONPATH={REPO} {' '.join(AWSOMEFSD)} \"$@\"\n")
    script.chmod(0o755)
    return script


def install_service(exe: Path | None, base: Path) -> Path:
    """The packaged unit with a drop-in that runs `exe` (None: this checkout) as /usr/bin/awsomefsd
    on a freshly formatted image, its state, log (daemon.log) and mount (mnt) all under `base`.
    Returns the directory of units for `systemd.PrivateSystemd`."""
    exe = checkout_command(base) if exe is None else exe
    units = base / "units"
    (units / f"{SERVICE}.d").mkdir(parents=True)
    shutil.copy(UNIT, units / SERVICE)
    config = base / "awsomefsd.toml"
    config.write_text(CONFIG.format(base=base))
    log = base / "daemon.log"
    (units / f"{SERVICE}.d" / "test.conf").write_text(DROP_IN.format(exe=exe, config=config, log=log))
    formatted = subprocess.run([str(exe), "format", "--size", "1G", "--config", str(config), str(base / "device.img")],
                               capture_output=True, text=True, timeout=120, check=False)
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    (base / "mnt").mkdir()
    return units


def check_service(exe: Path | None, base: Path) -> None:
    """The checks in the module docstring, with `exe` (None: this checkout) as /usr/bin/awsomefsd."""
    units = install_service(exe, base)
    log = base / "daemon.log"
    sd = systemd.PrivateSystemd(base, units)
    try:
        _exercise(sd, base / "mnt", log, base / "awsomefsd.toml")
    except BaseException:
        print(f"daemon log:\n{log.read_text(errors='replace')[-6000:] if log.exists() else ''}")
        print(f"systemd:\n{sd.output()}")
        raise
    finally:
        sd.close()


def _main_pid(sd: systemd.PrivateSystemd) -> str:
    state = sd.show(SERVICE, "MainPID", "ActiveState")
    return state["MainPID"] if state["ActiveState"] == "active" else "0"


def _daemon_pid(sd: systemd.PrivateSystemd, main_pid: str) -> str:
    """The daemon's own process: the service's main process, or under the onefile executable its
    child (systemd's main process is then the onefile bootstrap, which passes SIGINT and SIGTERM
    on and dies of any other signal; `awsomefsd hand-over` finds the daemon by its state lock)."""
    children = sd.run("cat", f"/proc/{main_pid}/task/{main_pid}/children").stdout.split()
    for child in children:
        environ = sd.run("cat", f"/proc/{child}/environ", check=False).stdout
        if f"NUITKA_ONEFILE_PARENT={main_pid}" in environ.split("\0"):
            return child
    return main_pid


def _replaced(sd: systemd.PrivateSystemd, before: str) -> bool:
    return _main_pid(sd) not in ("0", before)


def _replaced_or_failed(sd: systemd.PrivateSystemd, before: str) -> bool:
    return _replaced(sd, before) or sd.show(SERVICE, "ActiveState")["ActiveState"] == "failed"


def _exercise(sd: systemd.PrivateSystemd, mnt: Path, log: Path, config: Path) -> None:
    sd.systemctl("start", SERVICE)  # Type=notify: returns once the daemon is mounted and serving
    assert sd.mounted(mnt)
    # the default on more than one CPU: a read worker, under the unit's system-call filter (note 134)
    daemon = _daemon_pid(sd, _main_pid(sd))
    wait_for(lambda: any("fuse-worker" in sd.run("cat", f"/proc/{child}/cmdline", check=False).stdout
                         for child in sd.run("cat", f"/proc/{daemon}/task/{daemon}/children").stdout.split()),
             30, "the daemon's read worker")
    work = mnt / "work"
    sd.path(work).mkdir()
    sd.path(work / "read-me").write_bytes(b"r" * 100_000)
    reader = Reader(work / "read-me", prefix=sd.prefix)
    shell = start_shell(work, prefix=sd.prefix)
    assert shell_run(shell, "echo hello > from-shell && cat from-shell") == ["hello"]
    writer = start_writer(work / "log", sync_at=WRITER_LINES, prefix=sd.prefix, lines=WRITER_LINES)
    wait_for(lambda: writer.wrote() >= 50, 60, "the writer to be under way")

    # systemctl restart: SIGTERM, but the daemon sees the restart job and hands the mount over
    first = _main_pid(sd)
    sd.systemctl("restart", SERVICE)
    second = _main_pid(sd)
    assert second not in ("0", first), (first, second)
    assert sd.mounted(mnt), "systemctl restart leaves the mount in place"
    assert "handed the mount" in log.read_text() and "(handed over;" in log.read_text()
    assert not writer.has("done"), "the writer was to span the restart; make it longer"

    # systemctl reload (what the package's upgrade runs): the daemon starts the next one, hands
    # the mount over once that one has loaded, and names it the main process: systemd restarts
    # nothing (awsomefsd/daemon/handover.py)
    restarts = sd.show(SERVICE, "NRestarts")["NRestarts"]
    reloaded = sd.systemctl("reload", SERVICE, check=False)
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    wait_for(functools.partial(_replaced, sd, second), 60, "the next daemon after the reload")
    assert sd.show(SERVICE, "Result", "NRestarts") == {"Result": "success", "NRestarts": restarts}, \
        "the successor the daemon started is the main process, not one systemd started after it"
    assert "started the next daemon" in log.read_text()

    # A successor that cannot start leaves the daemon serving. Here it cannot read the configuration;
    # `hand-over` would refuse that one itself, so the daemon is asked by its signal.
    third = _main_pid(sd)
    good = config.read_text()
    config.write_text(good + "this is no TOML\n")
    try:
        sd.run("kill", "-USR2", _daemon_pid(sd, third))
        wait_for(lambda: "the next daemon exited before it could take over" in log.read_text(), 60,
                 "the daemon to see its successor fail")
    finally:
        config.write_text(good)
    assert _main_pid(sd) == third and sd.mounted(mnt)
    assert shell_run(shell, "cat from-shell") == ["hello"]

    wait_for(lambda: writer.has("done") or writer.proc.poll() is not None, 120, "the writer to finish")
    assert writer.wait(30) == 0, writer.lines
    done = next(line for line in writer.lines if line.startswith("done"))
    assert done.endswith("[]"), f"no fsync error across a restart and a reload: {done}"
    print(f"longest write across systemctl restart and reload: {float(done.split()[1]) * 1000:.0f} ms")
    assert sd.path(work / "log").read_bytes() == expected(WRITER_LINES)
    assert reader.read_size() == 100_000, "a descriptor opened before reads on"

    # a crash: systemd restarts the daemon (Restart=on-failure) and the store still holds the mount
    restarts = int(sd.show(SERVICE, "NRestarts")["NRestarts"])
    sd.run("kill", "-KILL", _main_pid(sd))
    wait_for(lambda: int(sd.show(SERVICE, "NRestarts")["NRestarts"]) > restarts and _main_pid(sd) != "0", 60,
             "systemd to restart the daemon after SIGKILL")
    assert sd.mounted(mnt)
    assert shell_run(shell, "cat from-shell && echo again > after && cat after") == ["hello", "again"]
    assert reader.read_size() == 100_000

    # Many hand-overs in a row: systemd counts every start against StartLimitBurst= (5 in 10
    # minutes), and the fifth reload or restart made it refuse the start, with the mount handed
    # over to nobody. A hand-over resets the count.
    for round_ in range(4):
        for operation in ("restart", "reload"):  # the stop below stops the successor of a reload
            before = _main_pid(sd)
            done_op = sd.systemctl(operation, SERVICE, check=False)
            assert done_op.returncode == 0, f"{operation} {round_}: {done_op.stdout}{done_op.stderr}"
            wait_for(functools.partial(_replaced, sd, before), 60, f"the daemon after {operation}")
    assert shell_run(shell, "cat after") == ["again"]
    assert reader.read_size() == 100_000
    reader.close()
    assert shell.stdin is not None
    shell.stdin.close()
    assert shell.wait(30) == 0

    # systemctl stop: unmounted, the store emptied; the next start mounts afresh with every byte.
    # The daemon is a reload's successor, which systemd supervises as the main process it started
    # (one that is not its child it took for "alien", and killed at once: Result "signal").
    sd.systemctl("stop", SERVICE)
    assert not sd.mounted(mnt), "systemctl stop unmounts"
    assert not re.search(r"read worker \d+ \(pid \d+\) exited", log.read_text()), "a read worker died under the unit"
    assert sd.show(SERVICE, "NFileDescriptorStore", "Result") == {"NFileDescriptorStore": "0", "Result": "success"}
    sd.systemctl("start", SERVICE)
    assert sd.path(work / "log").read_bytes() == expected(WRITER_LINES)

    # Crashes still add up: a daemon that keeps dying is given up on, not restarted forever.
    crashes = 0
    while sd.show(SERVICE, "ActiveState")["ActiveState"] != "failed":
        assert crashes < 8, f"{crashes} crashes in a row, and systemd still restarts the daemon"
        crashes += 1
        killed = _main_pid(sd)
        sd.run("kill", "-KILL", killed)
        wait_for(functools.partial(_replaced_or_failed, sd, killed), 60, "a restart after a crash, or none")
    assert sd.show(SERVICE, "ActiveState", "Result") == {"ActiveState": "failed", "Result": "signal"}
    assert crashes <= 6, f"{crashes} crashes in a row, and systemd still restarts the daemon"


@pytest.mark.mounted
@pytest.mark.skipif(systemd.available() is not None or not os.path.exists("/dev/fuse"),
                    reason=f"a private systemd: {systemd.available()}; and /dev/fuse")
def test_restart_reload_and_crash_keep_the_mount_and_stop_unmounts(base: Path) -> None:
    check_service(None, base)


# -- how the daemon tells a restart from a stop (awsomefsd/sdrestart.py) ---------------------------

CGROUP_V1 = "12:pids:/system.slice/awsomefsd.service\n1:name=systemd:/system.slice/awsomefsd.service\n0::/\n"
CGROUP_V2 = "0::/system.slice/awsomefsd.service\n"


def test_the_unit_is_read_from_the_cgroup() -> None:
    assert sdrestart.unit_of_cgroup(CGROUP_V1) == SERVICE
    assert sdrestart.unit_of_cgroup(CGROUP_V2) == SERVICE
    assert sdrestart.unit_of_cgroup("0::/system.slice/awsomefsd.service/payload\n") == SERVICE
    assert sdrestart.unit_of_cgroup("0::/user.slice/session-3.scope\n") is None
    assert sdrestart.unit_of_cgroup("4:memory:/system.slice/other.service\n0::/\n") is None


def test_only_a_restart_job_of_our_unit_counts() -> None:
    assert sdrestart.restart_job_in("14 awsomefsd.service restart running\n", SERVICE)
    assert sdrestart.restart_job_in("15 awsomefsd.service try-restart running\n", SERVICE)
    assert not sdrestart.restart_job_in("19 awsomefsd.service stop running\n", SERVICE)
    assert not sdrestart.restart_job_in("20 other.service restart running\n", SERVICE)
    assert not sdrestart.restart_job_in("", SERVICE)


def test_outside_systemd_or_when_systemctl_fails_sigterm_is_a_stop(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(CGROUP_V2)
    restarting = lambda args: f"7 {args[-1]} restart running\n"  # noqa: E731

    monkeypatch.delenv(sdrestart.SYSTEMD_INVOCATION_ENV, raising=False)
    assert not sdrestart.restart_pending(restarting, cgroup)
    monkeypatch.setenv(sdrestart.SYSTEMD_INVOCATION_ENV, "0123")
    assert sdrestart.restart_pending(restarting, cgroup)

    def failing(args: list[str]) -> str:
        raise subprocess.TimeoutExpired(["systemctl", *args], sdrestart.QUERY_TIMEOUT_S)

    assert not sdrestart.restart_pending(failing, cgroup)
    assert not sdrestart.restart_pending(restarting, tmp_path / "missing")


def test_a_hand_over_resets_the_start_limit_only_under_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(CGROUP_V1)
    asked: list[list[str]] = []

    def systemctl(args: list[str]) -> str:
        asked.append(args)
        return ""

    monkeypatch.delenv(sdrestart.SYSTEMD_INVOCATION_ENV, raising=False)
    assert not sdrestart.forget_starts(systemctl, cgroup) and asked == []
    monkeypatch.setenv(sdrestart.SYSTEMD_INVOCATION_ENV, "0123")
    assert sdrestart.forget_starts(systemctl, cgroup) and asked == [["reset-failed", SERVICE]]
