"""Bad input to the cluster commands gets one clear line and changes nothing (no daemon needed): missing
or malformed settings, a listener address in use, a directory as the device, a closed output pipe."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

from awsomefsd.cluster.ca import ClusterCA
from awsomefsd.cluster.state import MemberState
from awsomefsd.cluster.token import JoinToken
from tests.support.daemon import AWSOMEFSD, REPO, run_cli
from tests.support.ports import free_port, is_free


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
        proc = run_cli(*args, "--state", str(state), "--listen", f"127.0.0.1:{free_port()}")
        assert proc.returncode == 1
        assert "already belongs to node 2" in error_line(proc)
    assert (state / "cluster.json").read_bytes() == before


def test_join_refuses_a_damaged_token_and_a_device_of_another_cluster(tmp_path: Path) -> None:
    proc = run_cli("join", "awfs1_not-a-token", "--device", "x", "--state", str(tmp_path / "s"),
                   "--listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    assert "bad join token" in error_line(proc)
    image = tmp_path / "other.img"
    assert run_cli("format", str(image), "--size", "256M").returncode == 0
    token = JoinToken.generate(uuid.uuid4(), ClusterCA.create(uuid.uuid4()).fingerprint).encode()
    proc = run_cli("join", token, "--device", str(image), "--state", str(tmp_path / "s"), "--listen", f"127.0.0.1:{free_port()}")
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


def test_a_listener_address_in_use_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    """init formats and join joins before the listeners are bound: a port that is taken is found
    first, with the setting to change (gRPC would even share a TCP port: SO_REUSEPORT)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        cases = {
            f"[cluster] listen (--listen 127.0.0.1:{port})": ["--listen", f"127.0.0.1:{port}", "--metrics-port", "-1"],
            "[metrics] port (--metrics-port)": ["--listen", f"127.0.0.1:{free_port()}", "--metrics-port", str(port)],
        }
        if is_free(port - 1):
            cases["[cluster] listen port + 1"] = ["--listen", f"127.0.0.1:{port - 1}", "--metrics-port", "-1"]
        if is_free(port - 2) and is_free(port - 1):
            cases["the Raft wire, [cluster] listen port + 2"] = [
                "--listen", f"127.0.0.1:{port - 2}", "--metrics-port", "-1"]
        for setting, flags in cases.items():
            image = tmp_path / "dev.img"
            proc = run_cli("init", "--device", str(image), "--size", "256M", "--state", str(tmp_path / "s"),
                           "--mount", str(tmp_path / "m"), *flags)
            assert proc.returncode == 1, proc.stderr
            line = error_line(proc)
            assert setting in line and "in use" in line, line
            assert not image.exists(), "nothing may be formatted before the listeners are known to be free"
            assert not (tmp_path / "s" / "cluster.json").exists()
        token = JoinToken.generate(uuid.uuid4(), ClusterCA.create(uuid.uuid4()).fingerprint).encode()
        proc = run_cli("join", token, "--device", "x", "--state", str(tmp_path / "j"), "--listen", f"127.0.0.1:{port}",
                       "--metrics-port", "-1")
        assert proc.returncode == 1 and "[cluster] listen" in error_line(proc)
        assert not (tmp_path / "j" / "cluster.json").exists()
    finally:
        taken.close()


def test_a_csi_socket_in_use_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    try:
        proc = run_cli("run", "--device", str(tmp_path / "x.img"), "--state", str(tmp_path / "s"), "--mount",
                       str(tmp_path / "m"), "--metrics-port", "-1", "--csi-socket", str(path))
        assert proc.returncode == 1
        assert "[csi] socket" in error_line(proc) and "in use" in error_line(proc)
    finally:
        server.close()


def test_bad_arguments_get_one_line_and_no_traceback(tmp_path: Path) -> None:
    for args in (["fsck", "--device", str(tmp_path), "--state", str(tmp_path / "s")],
                 ["run", "--device", str(tmp_path), "--state", str(tmp_path / "s"), "--mount", str(tmp_path / "m")],
                 ["init", "--device", str(tmp_path), "--state", str(tmp_path / "s"), "--listen", f"127.0.0.1:{free_port()}"],
                 ["format", str(tmp_path)]):
        proc = run_cli(*args)
        assert proc.returncode == 1
        assert "a directory, not a block device or an image file" in error_line(proc), args


def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`awsomefsd status --json | head`: the reader goes away; no traceback (exit status as SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*AWSOMEFSD, "status", "--json", "--state", str(tmp_path / "s")], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                              timeout=60, check=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141, (proc.returncode, proc.stderr)


def test_fsck_of_a_member_finds_its_device_in_cluster_json(tmp_path: Path) -> None:
    image = tmp_path / "shared.img"
    assert run_cli("format", str(image), "--size", "256M").returncode == 0
    state = tmp_path / "member"
    MemberState(str(uuid.uuid4()), 2, "127.0.0.1:7470", device=str(image)).save(state)
    proc = run_cli("fsck", "--state", str(state))
    # It found the device from cluster.json, and (design note 53) checks only metadata that
    # exists: this made-up member has none, so fsck says so instead of making empty metadata.
    assert proc.returncode == 1 and f"holds no metadata of {image}" in proc.stderr, proc.stdout + proc.stderr
