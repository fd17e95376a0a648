"""`awsomefsd self-test`: touch every bundled dependency, the check that a compiled binary is whole.

Nuitka follows imports statically; a module pulled in by a C extension, by `importlib`, or only on a
rarely taken path is silently left out, and the binary fails on the customer's machine at the first
request that needs it. Importing is not enough either (a compiled extension can import and then
miss its shared library or a private submodule on first use), so each check does a small piece of
real work: an LMDB round trip, a gRPC call on loopback with the generated CSI messages, a trio run
with a worker thread, a metric rendered, settings parsed from TOML, pyfuse3 with libfuse3 loaded,
a zeroconf record encoded and decoded, a certificate signed, a checksum computed. It also imports
every `awsomefsd` module, so a third-party import anywhere in the project is covered.

The checks need no network beyond loopback, no root and no FUSE device, and finish in about a
second, so `build.py` runs them on every build and an operator can run them on a new host.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import awsomefsd
from awsomefsd import program

# Modules whose import has side effects (running the command line) rather than definitions.
IMPORT_WALK_SKIP = frozenset({"awsomefsd.__main__"})
GRPC_DEADLINE_S = 10.0


def check_stdlib() -> str:
    """The C accelerators Nuitka is known to drop (`_json`, `_bisect`) are present and used."""
    import bisect
    import json
    import json.decoder
    import ssl
    import zlib

    # typeshed does not declare json.decoder.c_scanstring (None when _json is missing)
    assert json.decoder.c_scanstring is not None, "_json C accelerator missing"  # type: ignore[attr-defined]
    assert bisect.bisect.__module__ in ("_bisect", "bisect") and bisect.bisect([1, 3], 2) == 1
    import _bisect  # noqa: F401  (the import itself is the check)

    assert json.loads(json.dumps({"a": [1, 2.5, None]})) == {"a": [1, 2.5, None]}
    assert zlib.decompress(zlib.compress(b"x" * 100)) == b"x" * 100
    return f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}"


def check_lmdb() -> str:
    """Open an environment, write and read back in two transactions: the C extension and liblmdb."""
    from awsomefsd.meta.inspect import store_round_trip

    return store_round_trip()


def check_trio() -> str:
    """A nursery, a memory channel and a worker thread: the parts the daemon's event loop uses."""
    import trio

    async def main() -> int:
        send, receive = trio.open_memory_channel[int](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send.send, 41)
            value = await receive.receive()
        return await trio.to_thread.run_sync(lambda: value + 1)

    result = trio.run(main)
    assert result == 42
    return f"trio {trio.__version__}, nursery + thread ok"


def check_grpc() -> str:
    """Serve the generated CSI Identity service on loopback and call it through the generated stub."""
    from concurrent import futures

    import grpc
    from google.protobuf import __version__ as protobuf_version

    from awsomefsd.csi.generated import csi_pb2, csi_pb2_grpc

    class Identity(csi_pb2_grpc.IdentityServicer):
        def GetPluginInfo(
            self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
        ) -> csi_pb2.GetPluginInfoResponse:
            return csi_pb2.GetPluginInfoResponse(name="selftest.awsomefs", vendor_version=awsomefsd.__version__)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0, "could not bind a loopback port"
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=GRPC_DEADLINE_S
            )
    finally:
        server.stop(grace=None)
    assert reply.name == "selftest.awsomefs", reply
    return f"grpcio {grpc.__version__}, protobuf {protobuf_version}, loopback call ok"


def check_prometheus() -> str:
    """Render a counter and a histogram in the text exposition format `/metrics` serves."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    Counter("selftest_ops", "self-test operations", registry=registry).inc()
    Histogram("selftest_latency_seconds", "self-test latency", registry=registry).observe(0.001)
    text = generate_latest(registry).decode()
    assert "selftest_ops_total 1.0" in text and "selftest_latency_seconds_bucket" in text, text
    return "prometheus-client rendered 2 metrics"


def check_settings() -> str:
    """Parse a TOML file and read it into the settings, as `awsomefsd run --config` does."""
    from awsomefsd.config import load_settings

    with tempfile.TemporaryDirectory(prefix="awsomefsd-selftest-") as tmp:
        path = Path(tmp) / "awsomefsd.toml"
        path.write_text('[node]\nname = "selftest"\n\n[metrics]\nport = 9999\n')
        settings = load_settings(path)
    assert settings.node.name == "selftest" and settings.metrics.port == 9999, settings
    return "TOML parsed into the settings"


def check_pyfuse3() -> str:
    """Load pyfuse3 (and through it libfuse3.so.3) and build the structures a FUSE reply uses."""
    import pyfuse3

    attr = pyfuse3.EntryAttributes()
    attr.st_ino = pyfuse3.ROOT_INODE
    attr.st_size = 4096
    assert attr.st_ino == 1 and attr.st_size == 4096
    maps = Path("/proc/self/maps").read_text()
    libfuse = sorted({line.split()[-1] for line in maps.splitlines() if "libfuse3.so" in line})
    assert libfuse, "pyfuse3 imported but libfuse3.so.3 is not mapped"
    return f"pyfuse3 {pyfuse3.__version__}, {', '.join(libfuse)}"


def check_fuse_transport() -> str:
    """Our FUSE transport: libc's mount(2) found through ctypes, a request decoded, an answer built."""
    from awsomefsd.fuse.kernel import abi, channel

    assert channel._libc.mount is not None and channel._libc.umount2 is not None
    request = abi.IN_HEADER.pack(abi.IN_HEADER.size + 5, abi.Op.LOOKUP, 7, 1, 0, 0, 0, 0, 0) + b"name\0"
    header = abi.parse_header(request)
    assert (header.opcode, abi.Body(request).name()) == (abi.Op.LOOKUP, b"name")
    answer = abi.reply(header.unique, abi.WRITE_OUT.pack(5, 0))
    assert abi.OUT_HEADER.unpack_from(answer) == (len(answer), 0, 7)
    return f"FUSE protocol 7.{abi.MINOR}, libc mount(2) via ctypes"


def check_zeroconf() -> str:
    """Encode a service announcement and decode it again: zeroconf's compiled DNS modules, no network."""
    import socket

    from zeroconf import DNSIncoming, DNSOutgoing, ServiceInfo, __version__
    from zeroconf.const import _FLAGS_QR_RESPONSE

    service_type = "_awsomefs._tcp.local."
    info = ServiceInfo(
        service_type,
        f"selftest.{service_type}",
        addresses=[socket.inet_aton("127.0.0.1")],
        port=7000,
        properties={"cluster": "selftest"},
        server="selftest.local.",
    )
    out = DNSOutgoing(_FLAGS_QR_RESPONSE)
    for record in info.dns_addresses():
        out.add_answer_at_time(record, 0)
    out.add_answer_at_time(info.dns_service(), 0)
    packets = out.packets()
    assert packets, "no packet encoded"
    incoming = DNSIncoming(packets[0])
    assert incoming.valid and len(incoming.answers()) == 2, incoming
    return f"zeroconf {__version__}, DNS record round trip ok"


def check_cryptography() -> str:
    """Sign and verify with an EC key, the primitive behind the cluster CA and node certificates."""
    from cryptography import __version__
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    signature = key.sign(b"awsomefs", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"awsomefs", ec.ECDSA(hashes.SHA256()))
    return f"cryptography {__version__}, ECDSA sign + verify ok"


def check_crc32c() -> str:
    """The block checksum must be the hardware/C implementation, with the standard check value."""
    import crc32c

    value = crc32c.crc32c(b"123456789")
    assert value == 0xE3069283, hex(value)
    return f"crc32c check value ok ({'hardware' if crc32c.hardware_based else 'software'})"


def check_awsomefsd_modules() -> str:
    """Import every module of the project, so any third-party import anywhere is exercised."""
    found = [info.name for info in pkgutil.walk_packages(awsomefsd.__path__, prefix="awsomefsd.")]
    names = [name for name in found if name not in IMPORT_WALK_SKIP]
    assert len(names) > 1, f"found only {names}: the package walk does not see the bundled modules"
    for name in names:
        importlib.import_module(name)
    return f"imported {len(names)} awsomefsd modules"


CHECKS: tuple[tuple[str, Callable[[], str]], ...] = (
    ("stdlib", check_stdlib),
    ("lmdb", check_lmdb),
    ("trio", check_trio),
    ("grpc", check_grpc),
    ("prometheus", check_prometheus),
    ("settings", check_settings),
    ("pyfuse3", check_pyfuse3),
    ("fuse transport", check_fuse_transport),
    ("zeroconf", check_zeroconf),
    ("cryptography", check_cryptography),
    ("crc32c", check_crc32c),
    ("modules", check_awsomefsd_modules),
)


def run_self_test() -> int:
    """Run every check, print one line each and a summary; 0 when all pass, 1 otherwise.

    A failing check prints its traceback to stderr and the others still run, so one build shows
    every missing module at once instead of one per compile.
    """
    compiled = "compiled" if program.compiled() else "interpreted"
    print(f"awsomefsd {awsomefsd.__version__} self-test ({compiled}, {sys.executable})")
    failed: list[str] = []
    started = time.monotonic()
    for name, check in CHECKS:
        try:
            detail = check()
        except Exception as exc:
            failed.append(name)
            print(f"  FAIL {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
        else:
            print(f"  ok   {name}: {detail}")
    elapsed_ms = (time.monotonic() - started) * 1000
    if failed:
        print(f"self-test: {len(failed)} of {len(CHECKS)} checks failed ({', '.join(failed)})")
        return 1
    print(f"self-test: all {len(CHECKS)} checks passed in {elapsed_ms:.0f} ms")
    return 0
