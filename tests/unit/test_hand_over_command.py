"""`awsomefsd hand-over` against a daemon that is still starting: such a daemon ignores SIGUSR2
until it serves (awsomefsd/cli/main.py), so the command must ask again, as a successor does
(`actions.ask_to_hand_over`). It asked once and then waited out its whole 120 s deadline.

A stand-in plays the daemon: it holds the state directory's lock as a daemon does, ignores the
first SIGUSR2 (it is "starting"), and exits at the next one, as a daemon that hands over."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.support.daemon import AWSOMEFSD, REPO, wait_for

STARTING_DAEMON = textwrap.dedent("""\
    import fcntl, os, signal, sys, time
    fd = os.open(sys.argv[1] + "/daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\\n".encode())
    asked = []
    signal.signal(signal.SIGUSR2, lambda *_: asked.append(1))
    print("locked", flush=True)
    while len(asked) < 2:  # the first request comes while it starts, and is lost
        time.sleep(0.01)
    os._exit(75)
""")


def test_hand_over_asks_again_a_daemon_that_was_still_starting(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    daemon = subprocess.Popen([sys.executable, "-c", STARTING_DAEMON, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == "locked\n"
        env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "NOTIFY_SOCKET")}
        env["PYTHONPATH"] = str(REPO)
        began = time.monotonic()
        done = subprocess.run([*AWSOMEFSD, "hand-over", "--state", str(state)], capture_output=True, text=True,
                              env=env, cwd="/", timeout=20)
        took = time.monotonic() - began
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"pid {daemon.pid} left the mount" in done.stdout
        assert took < 10, f"hand-over took {took:.1f} s: it asked the starting daemon only once"
        wait_for(lambda: daemon.poll() is not None, 10, "the stand-in daemon to exit")
        assert daemon.returncode == 75
    finally:
        daemon.kill()
        daemon.wait()
