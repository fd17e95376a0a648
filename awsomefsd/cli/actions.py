"""What each CLI command of a node does, in terms of settings and services (the parsing lives in
cli/main.py; a cluster member's commands in cli/cluster.py). Named actions, not commands: the
state machine's commands are meta/commands.py."""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import trio

from awsomefsd.config import Settings, load_settings, parse_size_bytes
from awsomefsd.errors import OperatorError

log = logging.getLogger(__name__)
DEV_IMAGE_NAME = "device.img"


def settings_from(config: Path | None, overrides: dict[str, Any], *, read_default_file: bool = True) -> Settings:
    try:
        return load_settings(config, read_default_file=read_default_file, **overrides)
    except FileNotFoundError as exc:
        raise OperatorError(str(exc)) from None
    except ValueError as exc:
        raise OperatorError(f"invalid settings: {_one_line(exc)}") from None


def _one_line(exc: ValueError) -> str:
    """Every wrong setting on one line: `section.key: what is wrong (got value)`, each setting
    once; other errors as they are."""
    from awsomefsd.config.sections import SettingsError

    if not isinstance(exc, SettingsError):
        return " ".join(str(exc).split())
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {error['msg']}{shown}")
    return "; ".join(parts)


@contextmanager
def state_lock(state_dir: Path, *, take_over: bool = False) -> Iterator[None]:
    """One process at a time owns a node's state: a second daemon or an fsck of a live node would
    see a half-committed batch. `take_over` (`--take-over`): a daemon that runs on this state is
    asked to hand its mount over, and the lock is taken once it has exited (`take_over_from`)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not take_over:
                raise OperatorError(f"{state_dir} is in use by a running awsomefsd (stop it first)") from None
            take_over_from(state_dir, fd)
        else:
            if take_over:  # nobody to take over from: a start like any other (awsomefsd/priority.py)
                from awsomefsd import priority

                priority.raise_for_start()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


TAKE_OVER_POLL_S = 0.005
HAND_OVER_POLL_S = 0.01
ASK_AGAIN_S = 1.0
"""A daemon asked while it still starts ignores the signal; asking again is harmless (a
hand-over in progress goes on)."""


def ask_to_hand_over(pid: int, state_dir: Path, done: Callable[[], bool], *, still: str, poll_s: float,
                     ask: Callable[[], None] | None = None) -> None:
    """Send daemon `pid` SIGUSR2 (or `ask()`), and again every ASK_AGAIN_S, until `done()`;
    OperatorError (one line) when it refuses (it then serves on) or after HAND_OVER_DEADLINE_S.
    The successor (`take_over_from`) and `awsomefsd hand-over` both wait here: a daemon still
    starting ignores the signal, and `hand-over` asked once, then waited out its whole deadline."""
    import signal

    from awsomefsd.fuse.kernel import takeover

    ask = ask or functools.partial(os.kill, pid, signal.SIGUSR2)
    sent = time.monotonic()
    deadline = sent + HAND_OVER_DEADLINE_S
    ask()
    while not done():
        refused = takeover.refusal(state_dir)
        if refused is not None:
            raise OperatorError(f"awsomefsd (pid {pid}) did not hand the mount over, it goes on serving it: {refused}")
        if time.monotonic() > deadline:
            raise OperatorError(f"awsomefsd (pid {pid}) {still} {HAND_OVER_DEADLINE_S:.0f} s after it was asked to "
                                "hand its mount over (its log says why)")
        if time.monotonic() - sent > ASK_AGAIN_S:
            sent = time.monotonic()
            try:
                ask()
            except (ProcessLookupError, BrokenPipeError):
                pass  # gone: done() says so at the next look
        time.sleep(poll_s)


def _locked(lock_fd: int) -> bool:
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def take_over_from(state_dir: Path, lock_fd: int) -> None:
    """Ask the daemon that holds `state_dir`'s lock to hand its mount over, and take the lock on
    `lock_fd` once it has exited. This process loads its code first, while the old daemon still
    serves: applications then wait only for the old daemon's drain and this one's opening of the
    storage, not for an interpreter loading the daemon (design note: a successor started first).
    Nothing of the state is touched before the lock is held, as after any restart. A successor
    the daemon started itself (under systemd: daemon/handover.py) asks on the pipe it was given."""
    from awsomefsd import priority
    from awsomefsd.daemon.handover import READY_FD_ENV
    from awsomefsd.daemon.node import MOUNT_RECORD
    from awsomefsd.fuse.kernel import takeover

    ready_fd = os.environ.pop(READY_FD_ENV, "")
    preload_daemon()
    pid = lock_holder(state_dir)
    if pid is None:
        raise OperatorError(f"{state_dir} is in use, and not by a daemon that can hand its mount over")
    if not (state_dir / MOUNT_RECORD).exists():  # an fsck, a dev cluster, a daemon still starting
        raise OperatorError(f"{state_dir} is in use by a process (pid {pid}) that serves no mount: nothing to take over")
    takeover.clear_refusal(state_dir)
    priority.raise_for_start()  # from here on applications wait for this process
    asked = time.monotonic()
    ask_to_hand_over(pid, state_dir, functools.partial(_locked, lock_fd), still=f"still holds {state_dir}",
                     poll_s=TAKE_OVER_POLL_S, ask=_SayLoaded(int(ready_fd)) if ready_fd else None)
    record = takeover.load(state_dir)
    if ready_fd and (record is None or record.handles is None):  # it stopped: this one must not mount afresh
        raise OperatorError(f"awsomefsd (pid {pid}) stopped instead of handing its mount over: nothing to take over")
    log.info("taking over from pid %d: it let go of the state %.0f ms after it was asked", pid,
             (time.monotonic() - asked) * 1000)


class _SayLoaded:
    """Tell the daemon that started this one (daemon/handover.py), once, that this one has loaded
    its code and which pid it has: it hands over now. A closed pipe means that daemon stopped
    meanwhile: there is nothing to take over."""

    def __init__(self, ready_fd: int) -> None:
        self.ready_fd = ready_fd

    def __call__(self) -> None:
        if self.ready_fd < 0:
            return
        fd, self.ready_fd = self.ready_fd, -1
        # what systemd is to supervise: this process, or the compiled onefile bootstrap that runs it
        onefile = os.environ.get("NUITKA_ONEFILE_PARENT", "")
        pid = int(onefile) if onefile == str(os.getppid()) else os.getpid()
        try:
            os.write(fd, f"loaded {pid}".encode())
        except BrokenPipeError:
            raise OperatorError("the daemon that started this one is stopping: nothing to take over") from None
        finally:
            os.close(fd)


def preload_daemon() -> None:
    """Load the modules a daemon needs to serve its first request (those `serve` imports where it
    runs, too), so that a successor does it before it asks the old daemon to go."""
    import awsomefsd.cli.preflight
    import awsomefsd.daemon.node
    import awsomefsd.fs.clock
    import awsomefsd.fuse.eio
    import awsomefsd.fuse.kernel.channel
    import awsomefsd.fuse.kernel.handlers
    import awsomefsd.fuse.kernel.keeper
    import awsomefsd.fuse.kernel.takeover
    import awsomefsd.fuse.mount
    import awsomefsd.fuse.transport
    import awsomefsd.sdnotify
    import awsomefsd.sdrestart  # noqa: F401


def lock_holder(state_dir: Path) -> int | None:
    """The pid `state_lock` wrote into the state's lock file, or None when it cannot be read."""
    try:
        return int((state_dir / "daemon.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def state_in_use(state_dir: Path) -> bool:
    try:
        fd = os.open(state_dir / "daemon.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def daemon_failure(exc: BaseException) -> str:
    """The one line the daemon leaves with after a fault it cannot go on from (awsomefsd/duty.py):
    a `Fatal` reason as is; anything else also logs its traceback (a bug to report)."""
    from awsomefsd.duty import fatal_reason, one_line

    reason = fatal_reason(exc)
    if reason is None:
        log.error("the daemon stopped on an unexpected error", exc_info=exc)
        reason = one_line(exc)
    return f"stopped: {reason}"


def device_errors() -> tuple[type[BaseException], ...]:
    """What opening a device or a node's state raises for bad input: one line for the user.
    Imported when called, so that `--help` does not load the storage stack."""
    from awsomefsd.daemon.node import NodeError
    from awsomefsd.io.errors import DeviceError

    return (DeviceError, NodeError)


def dev(state: Path, mount: Path, size: str, overrides: dict[str, Any], *, config: Path | None = None,
        take_over: bool = False) -> int:
    """The embedded default: an image file under `state`, formatted on first use, then mounted.
    `config` (`--config`) is read for everything but the paths dev chooses; without it no file is
    (a node's /etc/awsomefs/awsomefsd.toml is not for a demo).
    A size or a mount that cannot work is refused before the state directory or the image exists,
    so a failed first start leaves nothing that a corrected command would trip over.
    `take_over`: replace the daemon running on `state` (`state_lock`)."""
    from awsomefsd.io.device import BlockDevice, create_image
    from awsomefsd.io.errors import NotFormattedError
    from awsomefsd.io.superblock import format_device, read_superblock

    state = state.resolve()
    image = state / DEV_IMAGE_NAME
    size_bytes = dev_image_size(size)
    overrides = {**overrides}
    overrides["node"] = {**overrides.get("node", {}), "state_dir": state}
    overrides["device"] = {"path": image}
    overrides["mount"] = {"path": mount.absolute().parent.resolve() / mount.name}  # a stat of a kept mount waits
    settings = settings_from(config, overrides, read_default_file=False)
    check_mount(settings)
    with state_lock(state, take_over=take_over):
        preflight(settings)  # bad settings format nothing
        created = not image.exists()
        try:
            if created:
                create_image(image, size_bytes)
            device = BlockDevice.open(image)
            try:
                try:
                    read_superblock(device)
                except NotFormattedError:
                    if device.size_bytes < size_bytes:  # nothing in it yet (a failed first start): grow it
                        device.close()
                        create_image(image, size_bytes)
                        device = BlockDevice.open(image)
                    sb = format_device(device, cluster_id=uuid.uuid4(), label="dev")
                    print(f"awsomefsd: formatted {image} ({device.size_bytes} bytes, cluster {sb.cluster_id})",
                          flush=True)
            finally:
                device.close()
        except device_errors() as exc:
            if created:
                image.unlink(missing_ok=True)
            raise OperatorError(str(exc)) from None
        return _serve(settings)


def dev_image_size(size: str) -> int:
    """`dev --size` in bytes: whole blocks, within what a device may hold; else one line."""
    from awsomefsd.io.layout import BLOCK_SIZE, MAX_DEVICE_BYTES, MIN_DEVICE_BYTES

    try:
        size_bytes = parse_size_bytes(size)
    except ValueError as exc:
        raise OperatorError(f"--size {size}: {exc}") from None
    if size_bytes % BLOCK_SIZE:
        raise OperatorError(f"--size {size} ({size_bytes} bytes) is not a whole number of {BLOCK_SIZE}-byte blocks "
                            "(e.g. 8G, 512M)")
    if size_bytes < MIN_DEVICE_BYTES:
        raise OperatorError(f"--size {size} is too small: AwsomeFS needs at least {MIN_DEVICE_BYTES >> 20}M")
    if size_bytes > MAX_DEVICE_BYTES:
        raise OperatorError(f"--size {size} is more than AwsomeFS can address ({MAX_DEVICE_BYTES} bytes)")
    return size_bytes


def check_mount(settings: Settings) -> None:
    """The mount point and /dev/fuse, checked before anything is created (fuse/mount.py)."""
    from awsomefsd.fuse.mount import MountError, check_can_mount

    if settings.mount.path is None:
        return
    try:
        check_can_mount(settings.mount.path, transport=settings.mount.transport,
                        allow_other=settings.mount.allow_other)
    except MountError as exc:
        raise OperatorError(str(exc)) from None


def run(settings: Settings, *, take_over: bool = False) -> int:
    with state_lock(settings.node.state_dir, take_over=take_over):
        return _serve(settings)


def preflight(settings: Settings, *, cluster_listen: str | None = None, control: Path | None = None) -> None:
    """Refuse, before anything is formatted, joined or opened, to start with a listener address
    that is taken (awsomefsd/cli/preflight.py), or with a [tier] that cannot work: one line naming
    the setting."""
    from awsomefsd.cli.preflight import PortInUse, check_listeners

    try:
        check_listeners(settings, cluster_listen=cluster_listen, control=control)
    except PortInUse as exc:
        raise OperatorError(str(exc)) from None
    check_mount(settings)
    if settings.tier.enabled:
        from awsomefsd.daemon.tiering import TierConfigError, open_store

        try:
            open_store(settings)
        except TierConfigError as exc:
            raise OperatorError(str(exc)) from None


def _serve(settings: Settings) -> int:
    from awsomefsd import priority
    from awsomefsd.daemon.node import open_core, print_ready, serve
    from awsomefsd.fuse.mount import MountError

    def ready(mount: str) -> None:
        print_ready(mount)
        priority.restore(settings.node.serve_nice)  # serving competes as before, or at [node] serve_nice

    loaded = _since_process_start_s()
    logging.getLogger().setLevel(settings.log.level.upper())
    preflight(settings)
    try:
        core = open_core(settings)
    except device_errors() as exc:
        raise OperatorError(str(exc)) from None
    # how long a restart keeps applications waiting, phase by phase (bench/restart_bench.py)
    log.info("started: the daemon's code loaded %.0f ms and its storage open %.0f ms after the process began",
             loaded * 1000, _since_process_start_s() * 1000)
    try:
        handed_over = trio.run(functools.partial(serve, core, settings, ready=ready))
    except MountError as exc:
        raise OperatorError(str(exc)) from None
    except Exception as exc:
        raise OperatorError(daemon_failure(exc)) from None
    finally:
        core.close()
    if handed_over:
        print("awsomefsd: left the mount to the next daemon", flush=True)
        _exit_now(EXIT_HANDED_OVER)
    print("awsomefsd: unmounted", flush=True)
    return 0


def _exit_now(status: int) -> NoReturn:
    """End the process without the interpreter's teardown, which took 0.5 s after a hand-over
    (bench/restart_bench.py): the next daemon is started only once this one has exited, and
    applications wait meanwhile. Everything is durable and closed by then; only output is left to
    flush."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _since_process_start_s() -> float:
    """Seconds since this process began (the kernel's start time: 10 ms resolution)."""
    try:
        started = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return 0.0
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK")


EXIT_HANDED_OVER = 75
"""Exit status after SIGUSR2 handed the mount over: the unit restarts on it at once
(RestartForceExitStatus=75)."""


HAND_OVER_DEADLINE_S = 120.0


def hand_over(settings: Settings) -> int:
    """Ask the daemon that owns this node's state to hand its mount over (SIGUSR2) and wait until
    it has exited; its service manager starts the next one, which continues the mount."""
    state_dir = settings.node.state_dir
    if not state_in_use(state_dir):
        raise OperatorError(f"no awsomefsd runs on {state_dir}")
    pid = lock_holder(state_dir)
    if pid is None:
        raise OperatorError(f"cannot tell which process owns {state_dir}")
    from awsomefsd import sdrestart
    from awsomefsd.fuse.kernel import takeover

    sdrestart.forget_starts()  # under systemd: the start that follows is asked for, not a crash's
    takeover.clear_refusal(state_dir)
    # Until the process has exited, not only let go of the state: systemd runs this as the unit's
    # ExecReload, and the reload is to end once the old daemon is gone (design note 41). Under
    # systemd its successor holds the state by then (daemon/handover.py).
    ask_to_hand_over(pid, state_dir, lambda: not _alive(pid),
                     still="is still running (it keeps the mount when no descriptor store is set up)",
                     poll_s=HAND_OVER_POLL_S)
    print(f"awsomefsd: pid {pid} left the mount to the next daemon", flush=True)
    return 0


def _alive(pid: int) -> bool:
    """Is process `pid` running (a zombie, exited and not yet reaped by its parent, is not)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def format_device(settings: Settings, device_path: Path, *, force: bool, size: str | None, label: str) -> int:
    from awsomefsd.io.device import BlockDevice, create_image
    from awsomefsd.io.superblock import format_device as do_format

    try:
        if size is not None and not device_path.exists():
            create_image(device_path, parse_size_bytes(size))
        if not device_path.exists():
            raise OperatorError(f"{device_path} does not exist (give --size to create an image file)")
        device = BlockDevice.open(device_path)
        try:
            sb = do_format(device, cluster_id=uuid.uuid4(), label=label, force=force)
        finally:
            device.close()
    except ValueError as exc:
        raise OperatorError(str(exc)) from None
    except device_errors() as exc:
        raise OperatorError(str(exc)) from None
    layout = sb.layout
    print(f"awsomefsd: formatted {device_path}: cluster {sb.cluster_id}, device {sb.device_id}, "
          f"{layout.data_blocks} data blocks of {sb.block_size} bytes in {layout.ag_count} allocation groups")
    meta = settings.node.state_dir / "meta"
    if (meta / "data.mdb").exists():
        print(f"awsomefsd: note: {meta} holds metadata of an earlier format; use a fresh --state for this device")
    return 0


def fsck(settings: Settings, *, repair: bool, verify_data: bool) -> int:
    from awsomefsd.cli.fsck import run_fsck

    if state_in_use(settings.node.state_dir):
        raise OperatorError(f"{settings.node.state_dir} is in use by a running awsomefsd: stop it before fsck")
    with state_lock(settings.node.state_dir):
        if settings.device.path is None:
            settings = _device_of_state(settings)
        try:
            return run_fsck(settings, repair=repair, verify_data=verify_data)
        except device_errors() as exc:
            raise OperatorError(str(exc)) from None


def _device_of_state(settings: Settings) -> Settings:
    """No --device: the device a cluster member was set up with (its cluster.json), or a dev
    instance's image file."""
    settings = _with_state_defaults(settings)
    if settings.device.path is None:
        raise OperatorError("no device configured: give --device (or --state of a cluster member or a dev instance)")
    return settings


def _with_state_defaults(settings: Settings) -> Settings:
    """Fill in what the state directory knows and the settings do not: a cluster member's device
    and mount point (its cluster.json), or a dev instance's image file."""
    from awsomefsd.cluster.state import MemberState

    member = MemberState.load(settings.node.state_dir)
    device, mount = settings.device.path, settings.mount.path
    if member is not None:
        device = device or (Path(member.device) if member.device else None)
        mount = mount or (Path(member.mount) if member.mount else None)
    if device is None and (settings.node.state_dir / DEV_IMAGE_NAME).exists():
        device = settings.node.state_dir / DEV_IMAGE_NAME
    return settings.model_copy(update={"device": settings.device.model_copy(update={"path": device}),
                                       "mount": settings.mount.model_copy(update={"path": mount})})


def status(settings: Settings, *, as_json: bool) -> int:
    from awsomefsd.cli.status import collect_status, render_status, site_status
    from awsomefsd.cluster.state import MemberState

    member = MemberState.load(settings.node.state_dir)
    settings = _with_state_defaults(settings)
    running = state_in_use(settings.node.state_dir)
    info = collect_status(settings, running=running)
    if running and (member is None or settings.site.listen):
        info["site"] = site_status(settings, info)
    if member is not None:
        from awsomefsd.cli.cluster import cluster_status

        unanswered = "the daemon does not answer on its control socket"
        try:
            info["cluster"] = cluster_status(settings) if running else None
        except ConnectionError as exc:
            info["cluster"], unanswered = None, f"the daemon's control socket: {exc}"
        info["role"] = _member_role(member.node_id, info["cluster"])
        if running and info["cluster"] is None:
            info["problems"].append(unanswered)
            info["healthy"] = False
        elif not running:  # a member's daemon is its part of the cluster: stopped is not healthy
            info["problems"].append(f"the daemon is not running: node {member.node_id} serves no mount and "
                                    "takes no part in the cluster")
            info["healthy"] = False
    print(json.dumps(info, indent=2, sort_keys=True) if as_json else render_status(info))
    return 0 if info.get("healthy", False) else 1


def tier_status(settings: Settings, *, as_json: bool) -> int:
    """`awsomefsd tier status`: the object store's part of the file system, next to the device's."""
    from awsomefsd.cli.status import collect_status
    from awsomefsd.cli.tier import render_tier_status, tier_summary

    settings = _with_state_defaults(settings)
    info = collect_status(settings, running=state_in_use(settings.node.state_dir))
    tier = info.get("tier") or tier_summary(settings)
    free = info.get("metadata", {}).get("free_bytes")
    if as_json:
        print(json.dumps({**tier, "device_size_bytes": info["device"].get("size_bytes"), "device_free_bytes": free},
                         indent=2, sort_keys=True))
    else:
        print(render_tier_status(tier, info["device"], free))
    return 0


def _member_role(node_id: int, cluster: dict[str, Any] | None) -> str:
    if cluster is None:
        return f"cluster member {node_id}"
    me = next((n for n in cluster["nodes"] if n["id"] == node_id), None)
    return f"node {node_id}, {me['role'] if me else 'unknown role'}"
