"""`awsomefsd dev --nodes N`: a whole cluster in one command, as a developer runs it (a real separate
process, stopped with SIGINT as Ctrl-C stops it), checked through what it prints and describes:
every node mounted and sharing one namespace, each node's status, CSI socket and metrics reachable
the way it says, nothing of its network in the root namespace, and after Ctrl-C no daemon, mount or
namespace left. Then the same cluster again from its state, after a session killed with SIGKILL
left its daemons running, with a node added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster import network as netns
from tests.cluster.test_cluster_cli import error_line
from tests.support.daemon import run_cli
from tests.support.dev_cluster import (
    STOP_DEADLINE_S,
    DevSession,
    check_gone,
    check_running,
    daemon_pids,
    kill_leftovers,
    start_dev_cluster,
)

pytestmark = pytest.mark.netns


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[int], DevSession]]:
    reason = netns.available()
    if reason is not None:
        pytest.skip(f"network namespaces: {reason}")
    sessions: list[DevSession] = []

    def start_session(nodes: int) -> DevSession:
        session = start_dev_cluster(nodes, tmp_path / "state", tmp_path / "mnt")
        sessions.append(session)
        return session.wait_ready()

    try:
        yield start_session
    finally:
        kill_leftovers(sessions)


def test_a_cluster_in_one_command_and_nothing_left_after_ctrl_c(start: Callable[[int], DevSession], tmp_path: Path) -> None:
    session = start(3)
    info = session.description()
    assert len(info["nodes"]) == 3 and info["token"].startswith("awfs1_")
    check_running(info, session)
    assert session.interrupt() == 0, session.text()
    assert "Traceback" not in session.text() and "dev cluster stopped" in session.text(), session.text()
    check_gone(info, tmp_path / "state")


@pytest.mark.slow
def test_the_same_cluster_again_after_its_session_was_killed_and_with_a_node_added(start: Callable[[int], DevSession], tmp_path: Path) -> None:
    first = start(3)
    info = first.description()
    kept = Path(info["nodes"][0]["mount"], "kept")
    kept.write_bytes(b"still here")
    first.proc.kill()  # the session dies; its daemons run on without it
    first.proc.wait(STOP_DEADLINE_S)
    assert len(daemon_pids(tmp_path / "state")) == 3

    second = start(4)
    assert second.text().count("of an earlier session still runs") == 3, second.text()
    again = second.description()
    assert [n["node_id"] for n in again["nodes"][:3]] == [n["node_id"] for n in info["nodes"]]
    assert again["token"] == info["token"], "the same cluster, not a new one"
    assert Path(again["nodes"][3]["mount"], "kept").read_bytes() == b"still here"
    check_running(again, second)
    assert second.interrupt() == 0, second.text()
    check_gone(again, tmp_path / "state")

    refused = run_cli("dev", "--nodes", "2", "--state", str(tmp_path / "state"), "--mount", str(tmp_path / "mnt"))
    assert refused.returncode == 1 and "--nodes 4" in error_line(refused)
    assert not daemon_pids(tmp_path / "state")


@pytest.mark.parametrize(("args", "expected"), [
    (["--nodes", "0"], "2 to 9 nodes"),
    (["--nodes", "10"], "2 to 9 nodes"),
    (["--nodes", "3", "--size", "lots"], "--size lots"),
    (["--nodes", "3", "--size", "12"], "not a whole number of 4096-byte blocks"),
    (["--nodes", "3", "--csi-socket", "/tmp/x.sock"], "--csi-socket does not go with --nodes"),
    (["--nodes", "3", "--metrics-port", "0"], "--metrics-port does not go with --nodes"),
])
def test_bad_dev_cluster_arguments_get_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    proc = run_cli("dev", *args, "--state", str(tmp_path / "state"), "--mount", str(tmp_path / "mnt"))
    assert proc.returncode == 1 and expected in error_line(proc)
    assert not (tmp_path / "state").exists() and not (tmp_path / "mnt").exists(), "nothing made"
