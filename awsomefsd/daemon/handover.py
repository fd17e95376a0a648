"""How a daemon is asked to leave its mount to the next one, and, under systemd, how it starts that
next one first.

A hand-over stalls applications from the moment the daemon stops reading requests until the next
one serves them. Started after the old daemon has exited, the next one spends most of that time
loading its code (about 0.8 s of CPU, design note "a successor started first"). `--take-over`
avoids that by starting the next daemon first; it loads its code while the old one serves, and
only then asks it to go. Under systemd, `systemctl reload` (and a package upgrade) could not do
the same: systemd gives the descriptor store, where the mount's /dev/fuse descriptor lives, only
to the `ExecStart=` process, and one main process per service.

So at SIGUSR2 under systemd the daemon starts its successor itself (`SuccessorFirst`): the same
command it was started with, from the binary now installed, plus `--take-over`, with the mount's
descriptor inherited (keeper.HANDED_FD_ENV) and a pipe (READY_FD_ENV) on which the successor says
it has loaded its code. Then the hand-over runs as always: drain, sync, record the handles, let
go. Before exiting, the old daemon names the successor the service's main process (`MAINPID=`,
then a barrier so that systemd has taken it before it sees the old one exit). A successor that
fails before it is ready (a bad configuration, a crash) leaves the old daemon serving, and the
reload fails with its reason. systemd's store keeps its own copy of the descriptor throughout, so
if the successor dies later, systemd's restart continues the mount as after any crash.
`systemctl restart` stops the unit and kills every process in it: it still hands over to a daemon
systemd starts after the old one has exited.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable

import trio

from awsomefsd.fuse.kernel.keeper import HANDED_FD_ENV
from awsomefsd.program import own_command, own_environment

log = logging.getLogger(__name__)

READY_FD_ENV = "AWSOMEFS_SUCCESSOR_READY_FD"
"""A pipe's write end: the successor writes to it once its code is loaded (cli/actions.py,
`take_over_from`), which starts the hand-over."""
STALE_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID")
"""What systemd gave the old daemon for itself: the successor gets the descriptor another way, and
sends the watchdog's pings in the old one's place once it is the main process."""
MAINPID_BARRIER_S = 5.0


class SuccessorFirst:
    """Under systemd: SIGUSR2 (`ask`) starts the next daemon, and the hand-over (`hand_over`)
    begins once that one has loaded its code; `refuse` says why not when it fails first.

    The successor is started through `setsid --fork`, whose first process exits at once: the
    successor is then the init's child, as systemd's main process must be. systemd takes one that
    is not its child ("alien") for one it cannot see exit, and a stop then killed it at once
    instead of waiting for it to unmount."""

    def __init__(self, descriptor: Callable[[], tuple[str, int] | None], hand_over: Callable[[], Awaitable[bool]],
                 refuse: Callable[[str], None]) -> None:
        self.descriptor = descriptor
        self.hand_over = hand_over
        self.refuse = refuse
        self.asked = trio.Event()
        self.starting: trio.CancelScope | None = None
        """While a successor loads its code (`cancel` ends that)."""
        self.taking_over: int | None = None
        """The successor's pid once this daemon hands the mount over to it."""

    def ask(self) -> None:
        if self.starting is None:
            log.info("received SIGUSR2: starting the next daemon to hand the mount over to")
            self.asked.set()
        else:  # `awsomefsd hand-over` asks every second
            log.debug("received SIGUSR2: the next daemon is starting already")

    def cancel(self) -> None:
        """A stop (or systemd's restart) came first: the successor still loading is told to go
        (its pipe closes: cli/actions.py)."""
        if self.starting is not None and self.taking_over is None:
            log.info("the next daemon will not take over: this one stops")
            self.starting.cancel()

    async def run(self) -> None:
        """Start a successor each time one is asked for, until this daemon hands over."""
        while self.taking_over is None:
            await self.asked.wait()
            self.asked = trio.Event()
            with trio.CancelScope() as self.starting:
                await self._one()
            self.starting = None

    async def _one(self) -> None:
        kept = self.descriptor()
        if kept is None:
            self.refuse("no descriptor store keeps this mount")
            return
        name, fd = kept
        read_end, write_end = os.pipe()
        try:
            env = {key: value for key, value in own_environment().items() if key not in STALE_ENV}
            env.update({HANDED_FD_ENV: f"{name}:{fd}", READY_FD_ENV: str(write_end)})
            command = ["setsid", "--fork", *own_command(), *sys.argv[1:],
                       *([] if "--take-over" in sys.argv else ["--take-over"])]
            try:
                await trio.run_process(command, pass_fds=(fd, write_end), env=env, stdin=subprocess.DEVNULL, cwd="/")
            except (OSError, subprocess.CalledProcessError) as exc:
                self.refuse(f"the next daemon could not be started: {exc}")
                return
            os.close(write_end)
            write_end = -1
            log.info("started the next daemon; handing the mount over once it has loaded")
            os.set_blocking(read_end, False)
            await trio.lowlevel.wait_readable(read_end)
            said = os.read(read_end, 64).decode(errors="replace").split()
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        if len(said) != 2 or said[0] != "loaded" or not said[1].isdigit():
            self.refuse("the next daemon exited before it could take over (the log says why)")
            return
        self.taking_over = int(said[1])
        if not await self.hand_over():  # refused: the successor reads why (takeover.refusal) and exits
            self.taking_over = None

    def make_main(self) -> None:
        """After the hand-over: tell systemd that the successor is the service's main process now,
        and wait until it has taken that in (its exit is then no main process's)."""
        from awsomefsd import sdnotify

        if self.taking_over is None:
            return
        if not (sdnotify.notify(f"MAINPID={self.taking_over}") and sdnotify.barrier(MAINPID_BARRIER_S)):
            log.warning("systemd did not confirm pid %d as the main process: it may restart the service",
                        self.taking_over)


async def watch_signals(cancel: trio.CancelScope, stopping: Callable[[], Awaitable[None]],
                        hand_over: Callable[[], Awaitable[bool]] | None = None,
                        successor: SuccessorFirst | None = None) -> None:
    """SIGINT, SIGTERM: unmount and stop. SIGUSR2: stop serving and leave the mount to the next
    daemon (`systemctl reload`, a package upgrade), under systemd to one this daemon starts first
    (`successor`); SIGTERM and SIGINT too while systemd restarts the service (`systemctl
    restart`: `sdrestart`). SIGINT, because the compiled onefile binary's bootstrap passes
    systemd's SIGTERM on as SIGINT."""
    from awsomefsd import sdrestart

    # Once a stop has begun it finishes. A terminal's Ctrl-C reaches the compiled onefile bootstrap
    # and the daemon, and the bootstrap passes it on again; people press it twice; systemd sends
    # SIGTERM. When the receiver closes, it restores the handlers it found and hands them the
    # signals still queued: found ignored, none of those can interrupt the final flush
    # (KeyboardInterrupt) or end the process before it (SIGTERM's and SIGUSR2's default action).
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    for ignored in stop_signals:
        signal.signal(ignored, signal.SIG_IGN)
    with trio.open_signal_receiver(*stop_signals) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR2:
                if successor is not None:
                    successor.ask()
                elif hand_over is not None:
                    log.info("received SIGUSR2: handing the mount over")
                    await hand_over()
                continue
            if successor is not None:
                successor.cancel()
            if hand_over is not None and await trio.to_thread.run_sync(sdrestart.restart_pending):
                log.info("received %s while systemd restarts this service: handing the mount over",
                         signal.Signals(signum).name)
                if await hand_over():
                    await trio.to_thread.run_sync(sdrestart.forget_starts)  # asked for, not a crash
                    continue
            log.info("received %s: unmounting", signal.Signals(signum).name)
            await stopping()
            cancel.cancel()
            return
