"""Where a mount's /dev/fuse descriptor lives while its daemon is replaced.

A FUSE mount lives as long as some process holds its /dev/fuse descriptor. If only the daemon
holds it, a crash or a restart ends the mount: every application sees ENOTCONN. So right after
mounting, the daemon gives a copy of the descriptor to a holder that outlives it, and a daemon
that starts finds the mount's descriptor there and continues the session (docs/fuse-transport.md,
Restarts). Two holders:

- **systemd's file descriptor store** (`SystemdStore`): `FDSTORE=1` with the descriptor over
  `$NOTIFY_SOCKET`; systemd passes it back at the next start (`$LISTEN_FDS`, `$LISTEN_FDNAMES`).
  The unit sets `FileDescriptorStoreMax=`.
- **the keeper** (`KeeperStore`, `serve_keeper`): `awsomefsd fd-keeper --socket PATH`, a tiny
  process of its own, for where no systemd manages the daemon: a Kubernetes node plugin (the
  keeper runs in a pod of its own that the rolling update of the daemon's pod does not replace)
  or a test. A unix SOCK_SEQPACKET socket; one message per request, the descriptor in SCM_RIGHTS:
  `STORE name` (answer `OK`), `FETCH name` (`FD` with the descriptor, or `NONE`), `DROP name`
  (`OK`). It keeps its own copy when it hands one out.

Names are `fuse-` and a hash of the mount point: systemd allows no `:` or `/` in a name.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import selectors
import socket
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

MAX_MESSAGE = 4096
KEEPER_TIMEOUT_S = 5.0


def descriptor_name(mountpoint: Path) -> str:
    return "fuse-" + hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:24]


class DescriptorStore(Protocol):
    def put(self, name: str, fd: int) -> None:
        """Keep a copy of `fd` under `name` (replacing one kept before)."""

    def take(self, name: str) -> int | None:
        """A copy of the descriptor kept under `name`, or None."""

    def drop(self, name: str) -> None:
        """Close the copy kept under `name` (the mount ended)."""


class StoreError(OSError):
    pass


def descriptor_store(keeper: Path | None) -> DescriptorStore | None:
    """The keeper at `keeper` if configured, else systemd's store when systemd runs us, else none
    (the mount ends with the daemon)."""
    if keeper is not None:
        return KeeperStore(keeper)
    if SystemdStore.available():
        return SystemdStore()
    return None


# -- the keeper ------------------------------------------------------------------------------------
class KeeperStore:
    """The client side of `awsomefsd fd-keeper`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _ask(self, request: str, fd: int | None = None) -> tuple[str, int | None]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(KEEPER_TIMEOUT_S)
            try:
                sock.connect(str(self.path))
                socket.send_fds(sock, [request.encode()], [fd] if fd is not None else [])
                answer, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
            except OSError as exc:
                raise StoreError(exc.errno or errno.EIO, f"the descriptor keeper at {self.path}: "
                                 f"{exc.strerror or exc}") from None
        for extra in fds[1:]:
            os.close(extra)
        return answer.decode(errors="replace"), fds[0] if fds else None

    def put(self, name: str, fd: int) -> None:
        answer, _ = self._ask(f"STORE {name}", fd)
        if answer != "OK":
            raise StoreError(errno.EIO, f"the descriptor keeper at {self.path} refused: {answer}")

    def take(self, name: str) -> int | None:
        answer, fd = self._ask(f"FETCH {name}")
        if answer == "FD" and fd is not None:
            return fd
        if fd is not None:
            os.close(fd)
        return None

    def drop(self, name: str) -> None:
        self._ask(f"DROP {name}")


def serve_keeper(path: Path, *, ready: object = None) -> None:
    """Hold descriptors for whoever asks on `path`, until killed. Blocking, one thread: requests
    are a few per daemon start and stop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    kept: dict[str, int] = {}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    log.info("descriptor keeper on %s", path)
    if callable(ready):
        ready()
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                conn.settimeout(KEEPER_TIMEOUT_S)
                selector.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj  # type: ignore[assignment]
            selector.unregister(conn)
            with conn:
                try:
                    _answer_one(conn, kept)
                except OSError as exc:
                    log.warning("descriptor keeper: a request failed: %s", exc)


def _answer_one(conn: socket.socket, kept: dict[str, int]) -> None:
    message, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 4)
    verb, _, name = message.decode(errors="replace").partition(" ")
    if verb == "STORE" and name and len(fds) == 1:
        old = kept.pop(name, None)
        if old is not None:
            os.close(old)
        kept[name] = fds[0]
        log.info("keeping %s", name)
        conn.send(b"OK")
        return
    for fd in fds:
        os.close(fd)
    if verb == "FETCH" and name:
        held = kept.get(name)
        if held is None:
            conn.send(b"NONE")
        else:
            socket.send_fds(conn, [b"FD"], [held])
        return
    if verb == "DROP" and name:
        old = kept.pop(name, None)
        if old is not None:
            os.close(old)
            log.info("dropped %s", name)
        conn.send(b"OK")
        return
    conn.send(b"ERROR unknown request")


# -- systemd ---------------------------------------------------------------------------------------
class SystemdStore:
    """systemd's file descriptor store. `take` finds what systemd passed at this start."""

    LISTEN_FDS_START = 3

    def __init__(self) -> None:
        self.passed = self._passed()

    @staticmethod
    def available() -> bool:
        return bool(os.environ.get("NOTIFY_SOCKET"))

    def _passed(self) -> dict[str, int]:
        pid = os.environ.get("LISTEN_PID", "")
        ours = {str(os.getpid()), os.environ.get("NUITKA_ONEFILE_PARENT", "")}
        if not pid or pid not in ours:
            return {}
        try:
            count = int(os.environ.get("LISTEN_FDS", "0"))
        except ValueError:
            return {}
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        return {names[i] if i < len(names) else "": self.LISTEN_FDS_START + i for i in range(count)}

    def put(self, name: str, fd: int) -> None:
        from awsomefsd import sdnotify

        if not sdnotify.notify_fds([fd], "FDSTORE=1", f"FDNAME={name}"):
            raise StoreError(errno.EIO, "systemd did not take the descriptor (is $NOTIFY_SOCKET set?)")

    def take(self, name: str) -> int | None:
        fd = self.passed.pop(name, None)
        if fd is not None:
            os.set_inheritable(fd, False)
        return fd

    def drop(self, name: str) -> None:
        from awsomefsd import sdnotify

        sdnotify.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
