"""Start `awsomefsd dev` as a real separate process and wait for its mount, with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from awsomefsd.cli.devcluster.members import is_mounted, wait_for

REPO = Path(__file__).resolve().parents[2]
AWSOMEFSD = [sys.executable, "-m", "awsomefsd"]
START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 60.0


class Daemon:
    """One `awsomefsd dev` process; its output is collected for failure messages."""

    def __init__(self, state: Path, mount: Path, size: str = "1G", extra: list[str] | None = None,
                 env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        """`prefix`: what the command runs under (`nsenter --net=...` puts it in a network namespace)."""
        self.prefix = prefix or []
        self.state = state
        self.mount = mount
        self.size = size
        self.extra = extra or []
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._ready = threading.Event()

    def command(self) -> list[str]:
        return [*self.prefix, *AWSOMEFSD, "dev", "--state", str(self.state), "--mount", str(self.mount), "--size", self.size,
                "--metrics-port", "-1", *self.extra]

    def start(self) -> Daemon:
        self._ready.clear()
        self.output = []
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, cwd="/")
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop_hard()
                raise RuntimeError("awsomefsd did not mount:\n" + "".join(self.output[-60:]))
        return self

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)
            if line.startswith("awsomefsd: mounted"):
                self._ready.set()

    def stop(self) -> int:
        """SIGINT: the clean shutdown path (unmount, flush, commit)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.stop_hard()
            raise RuntimeError("awsomefsd did not stop on SIGINT:\n" + "".join(self.output[-60:])) from None
        wait_for(lambda: not is_mounted(self.mount), 10, "unmount")
        return code

    def kill(self) -> None:
        """SIGKILL: a crash. The mount is left stale, as after a real crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(STOP_DEADLINE_S)

    def stop_hard(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_DEADLINE_S)
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True, check=False)

    def logs(self) -> str:
        return "".join(self.output)


def run_cli(*args: str, timeout_s: float = 120.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AWSOMEFSD, *args], capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd="/", check=False)
