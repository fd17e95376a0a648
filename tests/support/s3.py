"""An S3 API server for the tests (tests/support/s3_server.py, a separate process) and a
fault-injecting HTTP proxy to put in front of it.

The proxy forwards each request to the server unchanged unless a planned fault matches it; then it
does what a slow, unreliable or broken store or network does: waits, answers an error status
without forwarding, drops the connection, sends a truncated or altered body, or forwards a PUT whose
body was damaged on the way (its Content-MD5 no longer matches). Faults are planned per method,
for the next N matching requests, and counted when injected, so a test can assert they happened.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from awsomefsd.cli.devcluster.network import Namespace
from tests.support.daemon import REPO
from tests.support.s3_server import BUCKET, KEY_ID, SECRET

START_DEADLINE_S = 60.0
TEST_KEY_ID, TEST_SECRET = KEY_ID, SECRET


@dataclass
class S3Server:
    """The running server: its endpoint, and a bucket made for the test."""

    proc: subprocess.Popen[str]
    port: int
    host: str = "127.0.0.1"
    bucket: str = BUCKET

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self) -> Any:
        """A boto3 client, for what the tests arrange or inspect (the product never lists)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET)

    def stored(self) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.bucket)
        return sorted(o["Key"] for o in listed.get("Contents", []))


@contextmanager
def s3_server(namespace: Namespace | None = None) -> Iterator[S3Server]:
    """The server on loopback, or in `namespace` on its private address (the test bucket made)."""
    argv = [sys.executable, "-m", "tests.support.s3_server"]
    options: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "cwd": REPO,
                               "env": {**os.environ, "PYTHONPATH": str(REPO)}}
    if namespace is None:
        proc = subprocess.Popen(argv, **options)
    else:
        proc = namespace.popen([*argv, namespace.address], **options)
    try:
        assert proc.stdout is not None
        ready = threading.Event()
        port: list[int] = []

        def read_port() -> None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip().isdigit():
                port.append(int(line))
            ready.set()

        threading.Thread(target=read_port, daemon=True).start()
        if not ready.wait(START_DEADLINE_S) or not port:
            raise RuntimeError("the S3 test server did not start")
        yield S3Server(proc, port[0], "127.0.0.1" if namespace is None else namespace.address)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


FAULTS = ("delay", "status", "drop", "truncate", "corrupt_response", "corrupt_request", "ignore_range")


@dataclass
class Fault:
    kind: str
    method: str | None  # None: any method
    remaining: int
    status: int = 500
    delay_s: float = 0.0
    code: str = "InternalError"


@dataclass
class FaultProxy:
    """Forwards to `upstream` (host, port); `plan()` faults; `injected` counts them by kind."""

    upstream: tuple[str, int]
    faults: list[Fault] = field(default_factory=list)
    injected: dict[str, int] = field(default_factory=dict)
    forwarded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def plan(self, kind: str, *, times: int = 1, method: str | None = None, status: int = 500,
             delay_s: float = 0.0, code: str = "InternalError") -> None:
        assert kind in FAULTS, kind
        with self.lock:
            self.faults.append(Fault(kind, method, times, status, delay_s, code))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def take(self, method: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.method in (None, method):
                    fault.remaining -= 1
                    self.injected[fault.kind] = self.injected.get(fault.kind, 0) + 1
                    return fault
            return None


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length", "0") or 0)
            body = self.rfile.read(length) if length else b""
            fault = proxy.take(self.command)
            kind = fault.kind if fault else ""
            if fault is not None and kind == "delay":
                time.sleep(fault.delay_s)
            if fault is not None and kind == "status":
                payload = f"<Error><Code>{fault.code}</Code></Error>".encode()
                self.send_response(fault.status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if kind == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
            if kind == "ignore_range":
                headers.pop("Range", None)
            if kind == "corrupt_request" and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                with proxy.lock:
                    proxy.forwarded += 1
            finally:
                conn.close()
            if kind == "corrupt_response" and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if kind == "truncate":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_DELETE = _forward

    return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
    """A request that fails (the upstream gone after its test, a client that hung up) ends its
    thread without a traceback: the handler threads outlive `shutdown`, and a traceback printed
    from one formats its lines with `ast.parse`, which CPython 3.11 does not make safe against a
    parse in another thread (gh-106905: "AST constructor recursion depth mismatch" in a later
    test of the same worker)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@contextmanager
def fault_proxy(upstream_endpoint: str) -> Iterator[FaultProxy]:
    host, port = upstream_endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)))
    server = _QuietServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
