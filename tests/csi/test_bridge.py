"""The trio<->gRPC bridge (awsomefsd/rpc/bridge.py) on its own, with a toy Identity servicer.

It checks what every gRPC service of the daemon relies on: the socket's mode and stale-file
handling, error translation, the per-call time limit, and the bound on handlers in flight.
"""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import grpc
import pytest
import trio

from awsomefsd.csi.generated import csi_pb2, csi_pb2_grpc
from awsomefsd.rpc.bridge import Binding, BridgeLimits, RpcAbort, serve_grpc

DEADLINE_S = 20.0


class ToyIdentity:
    """GetPluginInfo blocks until released and counts concurrency; Probe misbehaves on request."""

    def __init__(self) -> None:
        self.inflight = 0
        self.max_inflight = 0
        self.release = trio.Event()
        self.probe_mode = "ok"

    async def GetPluginInfo(self, request: object, context: object) -> csi_pb2.GetPluginInfoResponse:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await self.release.wait()
        finally:
            self.inflight -= 1
        return csi_pb2.GetPluginInfoResponse(name="toy", vendor_version="1")

    async def Probe(self, request: object, context: object) -> csi_pb2.ProbeResponse:
        if self.probe_mode == "abort":
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, "told to fail")
        if self.probe_mode == "crash":
            raise KeyError("secret internal detail")
        if self.probe_mode == "hang":
            await trio.sleep_forever()
        return csi_pb2.ProbeResponse()


async def start(nursery: trio.Nursery, servicer: ToyIdentity, address: str, **limits: float) -> str:
    bound: str = await nursery.start(
        lambda task_status: serve_grpc(
            [Binding(csi_pb2_grpc.add_IdentityServicer_to_server, servicer)],
            address,
            limits=BridgeLimits(**limits),  # type: ignore[arg-type]
            task_status=task_status,
        )
    )
    return bound


async def call(address: str, method: str, request: object) -> object:
    def blocking() -> object:
        with grpc.insecure_channel(address) as channel:
            stub = csi_pb2_grpc.IdentityStub(channel)
            return getattr(stub, method)(request, timeout=DEADLINE_S)

    return await trio.to_thread.run_sync(blocking)


async def code_of(address: str, method: str, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        await call(address, method, request)
    return err.value.code(), err.value.details() or ""


async def test_unix_socket_is_private_and_removed_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with trio.open_nursery() as nursery:
        address = await start(nursery, ToyIdentity(), f"unix://{path}")
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600 and stat.S_ISSOCK(path.lstat().st_mode)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sock"]  # the staging dir is gone
        assert isinstance(await call(address, "Probe", csi_pb2.ProbeRequest()), csi_pb2.ProbeResponse)
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_stale_socket_is_replaced_but_live_or_foreign_files_are_not(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a crashed daemon leaves
    async with trio.open_nursery() as nursery:
        address = await start(nursery, ToyIdentity(), f"unix://{stale}")
        await call(address, "Probe", csi_pb2.ProbeRequest())
        with pytest.raises(FileExistsError, match="another process"):
            await start(nursery, ToyIdentity(), f"unix://{stale}")
        nursery.cancel_scope.cancel()

    regular = tmp_path / "file"
    regular.write_text("not a socket")
    async with trio.open_nursery() as nursery:
        with pytest.raises(FileExistsError, match="not a socket"):
            await start(nursery, ToyIdentity(), f"unix://{regular}")
        with pytest.raises(ValueError, match="absolute"):
            await start(nursery, ToyIdentity(), "unix://relative.sock")
    assert regular.read_text() == "not a socket"


async def test_errors_are_translated(tmp_path: Path) -> None:
    servicer = ToyIdentity()
    async with trio.open_nursery() as nursery:
        address = await start(nursery, servicer, f"unix://{tmp_path / 's'}", max_call_s=0.5)
        servicer.probe_mode = "abort"
        assert await code_of(address, "Probe", csi_pb2.ProbeRequest()) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "told to fail",
        )
        servicer.probe_mode = "crash"
        code, details = await code_of(address, "Probe", csi_pb2.ProbeRequest())
        assert code == grpc.StatusCode.INTERNAL and "secret" not in details and "KeyError" in details
        servicer.probe_mode = "hang"
        code, _ = await code_of(address, "Probe", csi_pb2.ProbeRequest())
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        code, _ = await code_of(address, "GetPluginCapabilities", csi_pb2.GetPluginCapabilitiesRequest())
        assert code == grpc.StatusCode.UNIMPLEMENTED
        nursery.cancel_scope.cancel()


async def test_handlers_in_flight_are_bounded(tmp_path: Path) -> None:
    servicer = ToyIdentity()
    calls = 6
    async with trio.open_nursery() as nursery:
        address = await start(nursery, servicer, "127.0.0.1:0", max_inflight=2, max_workers=calls)
        assert not address.endswith(":0")
        baseline = trio.lowlevel.current_statistics().tasks_living
        done = []

        async def one() -> None:
            done.append(await call(address, "GetPluginInfo", csi_pb2.GetPluginInfoRequest()))

        async with trio.open_nursery() as clients:
            for _ in range(calls):
                clients.start_soon(one)
            # Wait until every call has reached the loop (one task each), then look: only two run.
            with trio.fail_after(DEADLINE_S):
                while trio.lowlevel.current_statistics().tasks_living < baseline + 2 * calls:
                    await trio.sleep(0.01)
            assert servicer.inflight == 2
            servicer.release.set()
        assert len(done) == calls and servicer.max_inflight == 2
        nursery.cancel_scope.cancel()


def test_limits_are_checked() -> None:
    with pytest.raises(AssertionError):
        BridgeLimits(max_inflight=0)
    with pytest.raises(AssertionError):
        BridgeLimits(max_workers=8, max_concurrent_rpcs=4)
