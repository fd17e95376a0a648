"""The control socket's deadlines (cluster/rpc.py): a request the daemon is still at work on when
the CLI's deadline passes is said to be that, not "no daemon"; no daemon at all is said to be
that. Each is one line for the operator. A real gRPC server on a unix socket, served as the
daemons serve it (`CONTROL_LIMITS`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import trio

from awsomefsd.cluster.rpc import CONTROL_LIMITS, ControlService, ControlTimeout, control_call
from awsomefsd.rpc.bridge import serve_grpc


async def slow(request: dict[str, Any]) -> dict[str, Any]:
    await trio.sleep(float(request["seconds"]))
    return {"done": True}


async def test_a_request_longer_than_the_callers_deadline_is_said_to_be_unfinished(tmp_path: Path) -> None:
    socket = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_grpc, [ControlService({"slow": slow}).binding()],
                                              f"unix://{socket}", limits=CONTROL_LIMITS))
        reply = await trio.to_thread.run_sync(control_call, str(socket), {"op": "slow", "seconds": 0.2}, 10.0)
        assert reply == {"done": True}
        with pytest.raises(ControlTimeout) as late:
            await trio.to_thread.run_sync(control_call, str(socket), {"op": "slow", "seconds": 5}, 0.5)
        assert "did not finish the request" in str(late.value) and "\n" not in str(late.value)
        assert "is the daemon running" not in str(late.value)
        nursery.cancel_scope.cancel()


def test_no_daemon_on_the_socket_is_said_to_be_that(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError) as missing:
        control_call(str(tmp_path / "control.sock"), {"op": "status"}, timeout_s=2)
    assert not isinstance(missing.value, ControlTimeout)
    assert str(missing.value).endswith("is the daemon running?") and "\n" not in str(missing.value)
