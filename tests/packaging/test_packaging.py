"""Release artefacts: the systemd unit, sd_notify, the default configuration, and (slow) the
compiled binary and the packages built from it, used the way an operator would.

The fast tests run everywhere. The slow test compiles with Nuitka (~10 min cold, ~2-3 min with
the ccache under /var/cache/awsomefs-build kept), so the long tier runs it (`scripts/test.sh
--long`; CI's packaging build is the wheel, test_wheel.py); it installs its own
tools through scripts/install-build.sh and needs root (dpkg, a FUSE mount).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from awsomefsd import __version__, sdnotify
from awsomefsd.cli import selftest
from awsomefsd.config import Settings, load_settings
from tests.packaging.test_systemd_service import check_service
from tests.support import systemd
from tests.support.daemon import AWSOMEFSD, Daemon, is_mounted
from tests.support.dev_cluster import check_gone, check_running, kill_leftovers, start_dev_cluster

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "awsomefsd.service"
DEFAULT_TOML = REPO / "packaging" / "awsomefsd.toml"
DIST = REPO / "dist"
STANDALONE = REPO / "build" / "nuitka" / "awsomefsd.dist" / "awsomefsd.bin"
MONITORING = ("/usr/share/awsomefs/monitoring/awsomefs-dashboard.json", "/usr/share/awsomefs/monitoring/awsomefs-alerts.yml")
MINIMAL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
BUILD_TIMEOUT_S = 45 * 60
# Options that give a service its own mount namespace: a FUSE mount made inside would be invisible.
MOUNT_NAMESPACE_OPTIONS = frozenset({
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "ReadWritePaths",
    "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectClock", "ProtectHostname", "ProtectProc", "RootDirectory", "RootImage", "MountAPIVFS",
})  # fmt: skip


def ensure_build_tools(*tools: str) -> None:
    """Install the build prerequisites the project's way when one of `tools` is missing."""
    if all(shutil.which(tool) for tool in tools):
        return
    subprocess.run([str(REPO / "scripts" / "install-build.sh")], check=True, timeout=1800)
    missing = [tool for tool in tools if not shutil.which(tool)]
    assert not missing, f"scripts/install-build.sh did not provide {missing}"


# ---------------------------------------------------------------------------------------------
# The systemd unit


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; systemd allows a key more than once."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def verify_unit(unit_text: str, root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` against a scratch root holding the distribution's units and a stub
    /usr/bin/awsomefsd, so the check needs neither an installed package nor a running systemd."""
    if not (root / "usr/lib/systemd/system").exists():
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
        (root / "usr/bin").mkdir(parents=True)
        stub = root / "usr/bin/awsomefsd"
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
        (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/awsomefsd.service").write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", f"--root={root}", "verify", "/etc/systemd/system/awsomefsd.service"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_unit_verifies_with_nothing_on_stderr(tmp_path: Path) -> None:
    ensure_build_tools("systemd-analyze")
    result = verify_unit(UNIT.read_text(), tmp_path)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_unit_check_catches_a_parse_error(tmp_path: Path) -> None:
    """verify exits 0 on unknown keys and bad values; only stderr tells, so the check reads it."""
    ensure_build_tools("systemd-analyze")
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd\nWatchdogSecs=1")
    result = verify_unit(broken, tmp_path)
    assert "kill mode" in result.stderr and "WatchdogSecs" in result.stderr, result.stderr


def test_unit_contract() -> None:
    """What the daemon and the onefile bootstrap rely on, and no option that hides the mount."""
    entries = unit_entries(UNIT.read_text())
    service = {key: value for section, key, value in entries if section == "Service"}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "all"  # the onefile bootstrap is MainPID, the daemon its child
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecStart"].startswith("/usr/bin/awsomefsd run ")
    assert service["StateDirectory"] == "awsomefs"
    assert service["Restart"] == "on-failure"
    # the mount outlives the daemon: its descriptor in the store, reload hands over, 75 restarts
    assert int(service["FileDescriptorStoreMax"]) >= 1
    assert service["ExecReload"].startswith("/usr/bin/awsomefsd hand-over ")
    assert "75" in service["RestartForceExitStatus"].split()
    assert "75" in service["SuccessExitStatus"].split()  # else a reload "fails" (test_systemd_service.py)
    assert float(service["WatchdogSec"].removesuffix("s")) > 0
    assert "NoNewPrivileges" in service and "SystemCallFilter" in service
    assert MOUNT_NAMESPACE_OPTIONS.isdisjoint(service), MOUNT_NAMESPACE_OPTIONS & service.keys()
    assert ("Install", "WantedBy", "multi-user.target") in entries
    # the onefile bootstrap lets a stopping daemon run as long as systemd would (Nuitka's default: 5 s)
    stop_s = int(service["TimeoutStopSec"].removesuffix("min")) * 60
    grace = [f for f in load_build_script().NUITKA_FLAGS if f.startswith("--onefile-child-grace-time=")]
    assert grace == [f"--onefile-child-grace-time={stop_s * 1000}"], grace


# ---------------------------------------------------------------------------------------------
# sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A real datagram socket standing in for systemd, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_messages(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("mounted /srv/awsomefs")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=mounted /srv/awsomefs"
    assert sdnotify.status("leader,\n3 nodes")
    assert notify_socket.recv(4096) == b"STATUS=leader, 3 nodes"
    assert sdnotify.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.extend_timeout(2.5)
    assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"awsomefs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_notify_outside_systemd_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.stopping() is False  # logged, never raised


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "NUITKA_ONEFILE_PARENT"):
        monkeypatch.delenv(name, raising=False)
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert sdnotify.watchdog_interval_s() is None  # meant for another process
    monkeypatch.setenv("NUITKA_ONEFILE_PARENT", str(os.getppid()))
    assert sdnotify.watchdog_interval_s() == 15.0  # our onefile bootstrap is systemd's main PID
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sdnotify.watchdog_interval_s() is None


async def test_run_watchdog_pings_every_half_period(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with trio.move_on_after(22):  # pings at 0, 5, 10, 15, 20 s of virtual time
        await sdnotify.run_watchdog()
    notify_socket.setblocking(False)
    pings = []
    while True:
        try:
            pings.append(notify_socket.recv(4096))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 5


async def test_run_watchdog_returns_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with trio.fail_after(1):
        await sdnotify.run_watchdog()


# ---------------------------------------------------------------------------------------------
# The default configuration file


DEFAULT_LINE = re.compile(r"^# (\w+ = .+)$")
EXAMPLE_LINE = re.compile(r"^#   (\w+ = .+)$")


def toml_with(pattern: re.Pattern[str]) -> str:
    """The shipped file with the lines matching `pattern` uncommented."""
    lines = DEFAULT_TOML.read_text().splitlines()
    return "\n".join(m.group(1) if (m := pattern.match(line)) else line for line in lines) + "\n"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWSOMEFS_"):
            monkeypatch.delenv(name)


def defaults() -> dict[str, Any]:
    return Settings().model_dump()


@pytest.mark.usefixtures("clean_env")
def test_default_toml_as_shipped_equals_the_defaults() -> None:
    assert load_settings(DEFAULT_TOML).model_dump() == defaults()


@pytest.mark.usefixtures("clean_env")
def test_default_toml_shows_the_true_defaults(tmp_path: Path) -> None:
    """Uncommenting every `# key = value` line changes nothing: the comments do not lie."""
    path = tmp_path / "uncommented.toml"
    path.write_text(toml_with(DEFAULT_LINE))
    assert load_settings(path).model_dump() == defaults()


@pytest.mark.usefixtures("clean_env")
def test_default_toml_documents_every_setting(tmp_path: Path) -> None:
    """Every field of every section appears, as its default or (when unset) as a valid example."""
    path = tmp_path / "everything.toml"
    path.write_text(toml_with(DEFAULT_LINE).replace("\n#   ", "\n"))
    shown = tomllib.loads(path.read_text())
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert hasattr(model, "model_fields"), section
        assert set(shown[section]) == set(model.model_fields), section
    examples = load_settings(path)
    assert examples.device.path is not None and examples.mount.path is not None


# ---------------------------------------------------------------------------------------------
# The compiled binary and the packages (slow)


def run(*command: str | Path, timeout_s: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout_s,
                          check=False, **kwargs)  # fmt: skip


def run_compiled(binary: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """From /, with a minimal environment: no virtualenv, no repository on any path."""
    return run(binary, *args, cwd="/", env=MINIMAL_ENV)


class CompiledDaemon(Daemon):
    """`awsomefsd dev` from the compiled binary instead of the interpreter."""

    def __init__(self, binary: Path, state: Path, mount: Path, size: str) -> None:
        super().__init__(state, mount, size=size)
        self.binary = binary
        self.env = dict(MINIMAL_ENV)

    def command(self) -> list[str]:
        return [str(self.binary), *super().command()[len(AWSOMEFSD) :]]


def check_binary(binary: Path) -> None:
    version = run_compiled(binary, "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"awsomefsd {__version__}"), version
    selftest = run_compiled(binary, "self-test")
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "all" in selftest.stdout and "checks passed" in selftest.stdout
    # it knows it is the executable (its package modules are bytecode: program.compiled), so a
    # hand-over or a read worker starts the executable, not a Python that is not there
    assert "(compiled, " in selftest.stdout, selftest.stdout


def check_format_and_mount(binary: Path, base: Path) -> None:
    image = base / "format-test.img"
    formatted = run_compiled(binary, "format", image, "--size", "256M")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    assert image.stat().st_size == 256 << 20
    mount = base / "mnt"
    daemon = CompiledDaemon(binary, base / "state", mount, size="256M").start()
    try:
        assert is_mounted(mount)
        (mount / "hello.txt").write_text("compiled\n")
        assert (mount / "hello.txt").read_text() == "compiled\n"
        assert daemon.stop() == 0, daemon.logs()
        assert not is_mounted(mount)
    finally:
        daemon.stop_hard()


def check_dev_cluster(binary: Path, base: Path) -> None:
    """`dev --nodes 2` from the compiled onefile binary: its nodes run that same binary (not the
    temporary copy it unpacks to, and no Python), and Ctrl-C leaves nothing behind."""
    session = start_dev_cluster(2, base / "dev-state", base / "dev-mnt", command=[str(binary)])
    try:
        session.wait_ready()
        info = session.description()
        assert all(node["status"].startswith(f"{binary} status ") for node in info["nodes"]), info
        check_running(info, session)
        assert session.interrupt() == 0, session.text()
        check_gone(info, base / "dev-state")
    finally:
        kill_leftovers([session])


def check_deb(deb: Path, marker: Path) -> None:
    """Install, reinstall over an edited conffile, remove (data kept), purge (data gone)."""
    assert run("dpkg-query", "-W", "awsomefsd").returncode != 0, "awsomefsd is already installed here"
    assert not Path("/var/lib/awsomefs").exists(), "/var/lib/awsomefs exists: refusing to purge it"
    installed = run("dpkg", "-i", deb)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    try:
        check_binary(Path("/usr/bin/awsomefsd"))
        conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "awsomefsd").stdout
        assert "/etc/awsomefs/awsomefsd.toml" in conffiles
        unit = Path("/lib/systemd/system/awsomefsd.service")
        verified = run("systemd-analyze", "verify", unit)
        assert (verified.returncode, verified.stderr) == (0, ""), verified.stderr
        assert Path("/var/lib/awsomefs").is_dir()
        assert Path("/var/lib/awsomefs").stat().st_mode & 0o777 == 0o700
        for shipped in MONITORING:
            assert Path(shipped).read_bytes() == (REPO / "packaging" / "monitoring" / Path(shipped).name).read_bytes()

        config = Path("/etc/awsomefs/awsomefsd.toml")
        config.write_text(config.read_text() + "# edited by the operator\n")
        reinstalled = run("dpkg", "-i", deb)
        assert reinstalled.returncode == 0, reinstalled.stdout + reinstalled.stderr
        assert config.read_text().endswith("# edited by the operator\n"), "conffile edit lost on upgrade"

        marker.write_text("node metadata")
        removed = run("dpkg", "-r", "awsomefsd")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert not Path("/usr/bin/awsomefsd").exists() and not Path("/usr/lib/awsomefs").exists()
        assert marker.exists() and config.exists(), "remove must keep data and configuration"
    finally:
        purged = run("dpkg", "-P", "awsomefsd")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not Path("/var/lib/awsomefs").exists() and not Path("/etc/awsomefs").exists()


def check_rpm(rpm: Path) -> None:
    files = run("rpm", "-qpl", rpm).stdout.split()
    for path in (
        "/usr/bin/awsomefsd",
        "/usr/lib/awsomefs/awsomefsd.bin",
        "/usr/lib/systemd/system/awsomefsd.service",
        "/etc/awsomefs/awsomefsd.toml",
        *MONITORING,
    ):
        assert path in files, f"{path} missing from {rpm.name}: {files[:20]}"
    assert run("rpm", "-qpc", rpm).stdout.split() == ["/etc/awsomefs/awsomefsd.toml"]
    requires = run("rpm", "-qp", "--requires", rpm).stdout
    assert "fuse3-libs" in requires and "glibc >=" in requires, requires
    scripts = run("rpm", "-qp", "--scripts", rpm).stdout
    assert "daemon-reload" in scripts and "postuninstall" in scripts, scripts


def load_build_script() -> Any:
    spec = importlib.util.spec_from_file_location("build_script", REPO / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # its dataclasses look their module up
    try:
        spec.loader.exec_module(build)
    finally:
        del sys.modules[spec.name]
    return build


def test_test_only_code_stays_out_of_the_build() -> None:
    """The test harnesses (tests/support/) are outside the package build.py compiles
    (--include-package=awsomefsd), so no flag has to keep them out: the self-test's import walk over
    the package meets no harness module, and no package module imports `tests`
    (tests/unit/test_layers.py)."""
    import pkgutil

    import awsomefsd

    build = load_build_script()
    assert "--include-package=awsomefsd" in build.NUITKA_FLAGS
    walked = [info.name for info in pkgutil.walk_packages(awsomefsd.__path__, prefix="awsomefsd.")]
    harnesses = {"linearizability", "raft_cluster", "raft_kv", "sqlite_wal", "testing"}
    assert [name for name in walked if harnesses & set(name.split("."))] == []
    assert selftest.check_awsomefsd_modules().startswith("imported ")


@pytest.mark.slow
@pytest.mark.mounted
@pytest.mark.serial  # installs the .deb on this machine (dpkg, /var/lib/awsomefs)
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_build_install_and_run(tmp_path: Path) -> None:
    ensure_build_tools("ccache", "patchelf", "lintian", "rpm", "dpkg-deb", "systemd-analyze")
    subprocess.run([str(REPO / "scripts" / "install-build.sh")], check=True, timeout=1800)
    built = subprocess.run([sys.executable, str(REPO / "build.py"), "all"], cwd=REPO, timeout=BUILD_TIMEOUT_S,
                           check=False)  # fmt: skip
    assert built.returncode == 0, "build.py all failed (output above)"
    info = json.loads((DIST / "build-info.json").read_text())
    print(f"build: {info}")

    check_binary(DIST / "awsomefsd")
    check_binary(STANDALONE)
    link = tmp_path / "bin" / "awsomefsd"  # as packaged: a symlink into the standalone tree
    link.parent.mkdir()
    link.symlink_to(STANDALONE)
    check_binary(link)

    check_deb(DIST / f"awsomefsd_{__version__}-1_amd64.deb", Path("/var/lib/awsomefs/marker"))
    check_rpm(DIST / f"awsomefsd-{__version__}-1.x86_64.rpm")

    base = Path("/var/tmp") / f"awsomefs-packaging-{os.getpid()}"
    base.mkdir()
    try:
        check_format_and_mount(DIST / "awsomefsd", base)
        check_dev_cluster(DIST / "awsomefsd", base)
    finally:
        if is_mounted(base / "mnt"):
            run("umount", "-l", base / "mnt")
        shutil.rmtree(base, ignore_errors=True)

    # The compiled binary under the packaged unit and a real systemd: restart, reload, a crash, stop.
    unavailable = systemd.available()
    assert unavailable is None, f"a private systemd cannot run here: {unavailable}"
    base.mkdir(mode=0o755)
    try:
        check_service(DIST / "awsomefsd", base)
    finally:
        shutil.rmtree(base, ignore_errors=True)

