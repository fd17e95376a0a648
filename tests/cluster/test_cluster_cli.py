"""Bad input to the cluster commands gets one clear line and changes nothing (no daemon needed)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from awsomefsd.cluster.ca import ClusterCA
from awsomefsd.cluster.state import MemberState
from awsomefsd.cluster.token import JoinToken
from tests.support.daemon import run_cli


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    stderr = proc.stderr
    lines = [line for line in stderr.splitlines() if line.startswith("awsomefsd: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def test_init_needs_a_listen_address(tmp_path: Path) -> None:
    proc = run_cli("init", "--device", str(tmp_path / "dev.img"), "--size", "256M", "--state", str(tmp_path / "s"))
    assert proc.returncode == 1
    assert "--listen" in error_line(proc)
    assert not (tmp_path / "dev.img").exists(), "nothing is created before the settings are complete"


def test_init_and_join_refuse_the_state_of_an_existing_member(tmp_path: Path) -> None:
    state = tmp_path / "s"
    MemberState(str(uuid.uuid4()), 2, "10.0.0.2:7470").save(state)
    before = (state / "cluster.json").read_bytes()
    token = JoinToken.generate(uuid.uuid4(), ClusterCA.create(uuid.uuid4()).fingerprint).encode()
    for args in (["init", "--device", str(tmp_path / "d.img"), "--size", "256M"], ["join", token, "--device", "x"]):
        proc = run_cli(*args, "--state", str(state), "--listen", "127.0.0.1:7470")
        assert proc.returncode == 1
        assert "already belongs to node 2" in error_line(proc)
    assert (state / "cluster.json").read_bytes() == before


def test_join_refuses_a_damaged_token_and_a_device_of_another_cluster(tmp_path: Path) -> None:
    proc = run_cli("join", "awfs1_not-a-token", "--device", "x", "--state", str(tmp_path / "s"),
                   "--listen", "127.0.0.1:7470")
    assert proc.returncode == 1
    assert "bad join token" in error_line(proc)
    image = tmp_path / "other.img"
    assert run_cli("format", str(image), "--size", "256M").returncode == 0
    token = JoinToken.generate(uuid.uuid4(), ClusterCA.create(uuid.uuid4()).fingerprint).encode()
    proc = run_cli("join", token, "--device", str(image), "--state", str(tmp_path / "s"), "--listen", "127.0.0.1:7470")
    assert proc.returncode == 1
    assert "but the token is for cluster" in error_line(proc)
    assert not (tmp_path / "s" / "cluster.json").exists()


def test_daemon_commands_say_what_is_missing(tmp_path: Path) -> None:
    proc = run_cli("token", "--state", str(tmp_path / "none"))
    assert proc.returncode == 1 and "not the state directory of a cluster member" in error_line(proc)
    state = tmp_path / "member"
    MemberState(str(uuid.uuid4()), 1, "127.0.0.1:7470").save(state)
    proc = run_cli("node", "remove", "3", "--state", str(state))
    assert proc.returncode == 1 and "is the daemon running?" in error_line(proc)
    proc = run_cli("token", "rotate", "--state", str(state))
    assert proc.returncode == 1 and "is the daemon running?" in error_line(proc)
