"""`awsomefsd dev` as an operator gets it wrong: a size that is not whole blocks or too small, a
regular file as the mount point, no /dev/fuse, a user who is not root. Each is one line on stderr
(no traceback), exit status 1, and nothing left behind (no state directory, no image), so the
corrected command just works. An image a failed start of an older version left too small is
grown to the size asked for."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.fuse.mount import user_allow_other
from tests.support.daemon import AWSOMEFSD, REPO, Daemon, run_cli

pytestmark = pytest.mark.mounted
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="awsomefs-mistakes-", dir="/var/tmp"))
    path.chmod(0o755)  # `nobody` reaches the paths below it
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path / "mnt")], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


def dev_args(base: Path, *extra: str) -> list[str]:
    return ["dev", "--state", str(base / "state"), "--mount", str(base / "mnt"), "--metrics-port", "-1", *extra]


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error line of a refused start: exit 1, one line on stderr, nothing else."""
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("awsomefsd: error: "), \
        (done.returncode, done.stdout, done.stderr)
    return lines[0]


def assert_nothing_left(base: Path) -> None:
    assert not (base / "state").exists(), sorted(p.name for p in (base / "state").iterdir())
    assert not (base / "mnt").exists()


@pytest.mark.parametrize(("size", "says"), [
    ("12", "not a whole number of 4096-byte blocks"),
    ("10M", "too small: AwsomeFS needs at least 64M"),
    ("lots", "not a size"),
])
def test_a_bad_size_is_one_line_and_creates_nothing(base: Path, size: str, says: str) -> None:
    line = one_line_error(run_cli(*dev_args(base, "--size", size)))
    assert says in line, line
    assert_nothing_left(base)


def test_a_regular_file_as_mount_point_is_one_line(base: Path) -> None:
    (base / "mnt").write_text("not a directory\n")
    line = one_line_error(run_cli(*dev_args(base, "--size", "64M")))
    assert f"the mount point {base / 'mnt'} is not a directory" in line, line
    assert not (base / "state").exists() and (base / "mnt").read_text() == "not a directory\n"


def test_no_dev_fuse_is_one_line(base: Path) -> None:
    """A mount namespace of its own whose /dev has no fuse (what a container without
    `--device /dev/fuse`, or a kernel without the module, looks like)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    (base / "dev").mkdir()
    script = (f"mount -t tmpfs tmpfs {base / 'dev'} && for d in null zero urandom; do "
              f"touch {base / 'dev'}/$d && mount --bind /dev/$d {base / 'dev'}/$d; done && "
              f"mount --bind {base / 'dev'} /dev && exec \"$@\"")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                           *AWSOMEFSD, *dev_args(base, "--size", "64M")],
                          capture_output=True, text=True, timeout=120, cwd="/",
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    line = one_line_error(done)
    assert "/dev/fuse does not exist: load the fuse module (modprobe fuse)" in line, line
    assert_nothing_left(base)


def test_not_root_is_one_line_that_says_what_to_do(base: Path) -> None:
    """The kernel transport mounts with mount(2): root only. The pyfuse3 transport mounts through
    fusermount3, which needs /dev/fuse open to the user and, for allow_other, user_allow_other."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv(1)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [*NOBODY, *AWSOMEFSD, *dev_args(base, "--size", "64M")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/",
                          env={**env, "AWSOMEFS_MOUNT__TRANSPORT": "kernel"}, check=False)
    line = one_line_error(done)
    assert "the kernel transport needs root: run awsomefsd as root" in line and "pyfuse3" in line, line
    assert_nothing_left(base)
    if stat.S_IMODE(os.stat("/dev/fuse").st_mode) & 0o006 != 0o006:
        expected = "/dev/fuse is not open to this user"
    elif not user_allow_other():
        expected = "allow_other needs user_allow_other in /etc/fuse.conf"
    else:
        pytest.skip("this machine lets users mount through fusermount3 with allow_other: nothing to refuse")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/",
                          env={**env, "AWSOMEFS_MOUNT__TRANSPORT": "pyfuse3"}, check=False)
    line = one_line_error(done)
    assert expected in line, line
    assert_nothing_left(base)


def test_an_image_left_too_small_grows_to_the_size_asked(base: Path) -> None:
    """A failed first start of an older version left a 10 MiB, unformatted image; the next start
    with a valid --size grows it and formats, instead of refusing every size from then on."""
    (base / "state").mkdir()
    (base / "state" / "device.img").write_bytes(b"")
    os.truncate(base / "state" / "device.img", 10 << 20)
    daemon = Daemon(base / "state", base / "mnt", size="128M").start()
    try:
        assert (base / "state" / "device.img").stat().st_size == 128 << 20
        (base / "mnt" / "f").write_text("it works\n")
        assert (base / "mnt" / "f").read_text() == "it works\n"
    finally:
        assert daemon.stop() == 0, daemon.logs()
