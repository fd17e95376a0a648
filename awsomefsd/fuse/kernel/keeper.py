"""Where a mount's /dev/fuse descriptor lives while its daemon is replaced.

A FUSE mount lives as long as some process holds its /dev/fuse descriptor. If only the daemon
holds it, a crash or a restart ends the mount: every application sees ENOTCONN. So right after
mounting, the daemon gives a copy of the descriptor to a holder that outlives it, and a daemon
that starts finds the mount's descriptor there and continues the session (docs/fuse-transport.md,
Restarts). Two holders:

- **systemd's file descriptor store** (`SystemdStore`): `FDSTORE=1` with the descriptor over
  `$NOTIFY_SOCKET`; systemd passes it back at the next start (`$LISTEN_FDS`, `$LISTEN_FDNAMES`).
  The unit sets `FileDescriptorStoreMax=`. systemd passes it to `ExecStart=` only, so at a reload
  the daemon starts its successor itself and hands it the descriptor as it starts it
  (`HANDED_FD_ENV`; awsomefsd/daemon/handover.py).
- **the keeper** (`KeeperStore`, `serve_keeper`): `awsomefsd fd-keeper --socket PATH`, a tiny
  process of its own, for where no systemd manages the daemon: a Kubernetes node plugin (the
  keeper runs in a pod of its own that the rolling update of the daemon's pod does not replace)
  or a test. A unix SOCK_SEQPACKET socket; one message per request, the descriptor in SCM_RIGHTS,
  any number of requests on one connection: `HOLD name device` (answer `HELD name device`: it
  keeps this descriptor, of the mount `device`, now), `STORE name` (`OK`: the same without the
  mount, what daemons before HOLD send), `FETCH name` (`FD` with the descriptor, or `NONE`),
  `DROP name` (`OK`). It keeps its own copy when it hands one out.

The keeper can be restarted (an update of its DaemonSet, an OOM kill) and then holds nothing.
A daemon therefore keeps a connection open to it while it serves (`watch_keeper`): the keeper's
exit ends that connection, and the daemon reconnects with backoff and gives the descriptor again;
a daemon started before its keeper registers the same way once the keeper appears. A hand-over
gives the descriptor once more right before the daemon lets go of its own (`hold`), and goes
ahead only if the keeper answers that it holds it (docs/fuse-transport.md, Restarts).

Names are `fuse-` and a hash of the mount point: systemd allows no `:` or `/` in a name.
"""

from __future__ import annotations

import array
import errno
import hashlib
import logging
import os
import select
import selectors
import socket
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

MAX_MESSAGE = 4096
KEEPER_TIMEOUT_S = 5.0
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 1.0
"""Backoff of a daemon reconnecting to a keeper that is not there: each wait doubles up to this.
A restarted keeper gets the descriptor within that much of listening again."""
OLD_KEEPER_CHECK_S = 2.0
"""How often a daemon asks a keeper from before HOLD (it closes every connection after one
answer, so its exit cannot be seen) whether it still has the descriptor."""


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

    def hold(self, name: str, fd: int, device: str) -> None:
        """Give the keeper `fd`, the descriptor of the mount `device`, and return once it says it
        holds it (StoreError otherwise). A keeper from before HOLD is given it with STORE."""
        device = device or "?"  # unknown: the answer must still name it
        answer, extra = self._ask(f"HOLD {name} {device}", fd)
        if extra is not None:
            os.close(extra)
        if answer == UNKNOWN:
            self.put(name, fd)
        elif answer != f"HELD {name} {device}":
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


UNKNOWN = "ERROR unknown request"


async def watch_keeper(store: KeeperStore, name: str, fd: int, device: str) -> None:
    """While the daemon serves: see that the keeper holds the descriptor `fd` of the mount
    `device`, whenever it (re)appears. Runs until cancelled.

    It gives the descriptor with HOLD and keeps that connection open: the keeper's exit ends it,
    and the daemon reconnects, with backoff while nothing listens, and gives it again. Until then
    a crash of this daemon would end the mount, and a hand-over is refused (`hold`), which the
    log says once per absence."""
    import trio

    device = device or "?"
    delay = RECONNECT_FIRST_S
    missing: str | None = None
    while True:
        try:
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
                await sock.connect(str(store.path))
                await sock.sendmsg([f"HOLD {name} {device}".encode()],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                answer = (await sock.recv(MAX_MESSAGE)).decode(errors="replace")
                if answer == f"HELD {name} {device}":
                    log.info("the descriptor keeper at %s holds the mount %s", store.path, device)
                    missing, delay = None, RECONNECT_FIRST_S
                    while await sock.recv(MAX_MESSAGE):  # nothing comes until the keeper exits
                        pass
                    log.warning("the descriptor keeper at %s went away: giving it the mount again when it is back",
                                store.path)
                    continue
        except OSError as exc:
            answer = f"{exc.strerror or exc}"
        if answer == UNKNOWN:
            await _watch_old_keeper(store, name, fd)
            continue
        if missing is None:
            log.warning("the descriptor keeper at %s does not hold the mount (%s): until it does, a crash of this "
                        "daemon ends the mount and a hand-over is refused; trying again", store.path, answer)
        missing = answer
        await trio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)


async def _watch_old_keeper(store: KeeperStore, name: str, fd: int) -> None:
    """A keeper from before HOLD: give it the descriptor with STORE and ask every
    OLD_KEEPER_CHECK_S whether it still has it. Returns when it has not (restarted, perhaps as a
    newer keeper): the caller gives it again."""
    import trio

    try:
        await trio.to_thread.run_sync(store.put, name, fd)
        log.info("the descriptor keeper at %s (an older one) holds the mount", store.path)
        while True:
            await trio.sleep(OLD_KEEPER_CHECK_S)
            kept = await trio.to_thread.run_sync(store.take, name)
            if kept is None:
                return
            os.close(kept)
    except OSError:
        return


def serve_keeper(path: Path, *, ready: object = None) -> None:
    """Hold descriptors for whoever asks on `path`, until killed. Blocking, one thread: requests
    are a few per daemon start and stop. A connection stays open until its client closes it: a
    daemon watches the keeper through it (`watch_keeper`)."""
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
            try:
                more = _answer_one(conn, kept)
            except OSError as exc:
                log.warning("descriptor keeper: a request failed: %s", exc)
                more = False
            if not more:
                selector.unregister(conn)
                conn.close()


def _answer_one(conn: socket.socket, kept: dict[str, int]) -> bool:
    """Answer one request on `conn`; False once the client has closed it."""
    message, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 4)
    if not message and not fds:
        return False
    words = message.decode(errors="replace").split(" ")
    verb, name = words[0], words[1] if len(words) > 1 else ""
    if verb in ("HOLD", "STORE") and name and len(fds) == 1:
        device = words[2] if verb == "HOLD" and len(words) > 2 else None
        if _ended(fds[0]):
            os.close(fds[0])
            conn.send(b"ERROR the descriptor's FUSE connection has ended")
            return True
        old = kept.pop(name, None)
        if old is not None:
            os.close(old)
        kept[name] = fds[0]
        # once per mount a keeper gets: a daemon gives its descriptor again at each hand-over
        log.log(logging.DEBUG if old is not None else logging.INFO, "keeping %s%s", name,
                f" (the mount {device})" if device else "")
        conn.send(f"HELD {name} {device}".encode() if device else b"OK")
        return True
    for fd in fds:
        os.close(fd)
    if verb == "FETCH" and name:
        held = kept.get(name)
        if held is None:
            conn.send(b"NONE")
        else:
            socket.send_fds(conn, [b"FD"], [held])
        return True
    if verb == "DROP" and name:
        old = kept.pop(name, None)
        if old is not None:
            os.close(old)
            log.info("dropped %s", name)
        conn.send(b"OK")
        return True
    conn.send(b"ERROR unknown request")
    return True


def _ended(fd: int) -> bool:
    """Has the FUSE connection of /dev/fuse descriptor `fd` ended (unmounted or aborted)? The
    kernel's poll then says POLLERR; nothing could serve that mount again."""
    poller = select.poll()
    poller.register(fd, select.POLLERR)
    return any(events & (select.POLLERR | select.POLLNVAL) for _fd, events in poller.poll(0))


# -- systemd ---------------------------------------------------------------------------------------
HANDED_FD_ENV = "AWSOMEFS_HANDED_FUSE_FD"
"""`name:fd`: the descriptor of a mount that the daemon before this one passed to it as it started
it (a reload under systemd: awsomefsd/daemon/handover.py)."""


class SystemdStore:
    """systemd's file descriptor store. `take` finds what systemd passed at this start, or what the
    daemon before passed (`HANDED_FD_ENV`)."""

    LISTEN_FDS_START = 3

    def __init__(self) -> None:
        self.passed = self._passed()
        handed = os.environ.pop(HANDED_FD_ENV, "")  # for this process only, not for what it starts
        name, _, fd = handed.rpartition(":")
        if name and fd.isdigit():
            self.passed[name] = int(fd)

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
