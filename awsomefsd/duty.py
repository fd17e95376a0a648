"""Background duties: work a node does on its own (lease renewal, group claims, hand-overs of write
leases, orphan release, the delayed-free reclaimer, the flusher), kept alive through every fault.

Why one wrapper instead of try/except in each loop: a background task that lets an exception out
tears down the trio nursery it runs in, and with it the mount (every application on the node gets
ENOTCONN and loses its buffered writes). The faults a cluster member lives through — its lease
expiring while it was paused, a partition, a leader dying mid-call, a peer's stream breaking —
surface as many different exceptions (FsError of any errno, WriteFencedError, ProposalTimeout,
trio.BrokenResourceError, grpc.RpcError, TimeoutError...), and each loop that forgot one of them
was a way for the daemon to exit. So a duty is
- a step run in a loop (`run_duty`), or a long-lived loop restarted after it fails (`supervise`);
- an error in it is logged once per kind (duty, exception type and errno) with the node and the
  reason, counted (`awsomefs_duty_errors_total{duty,kind}`), and followed by a back-off that grows
  to `MAX_BACKOFF_S` while the error persists; the first success after errors is logged once;
- only an unrecoverable local fault ends the daemon: the metadata store failing (STORE_FAILURES), no
  memory, a log this build cannot decode (`LogAheadOfBuild`: a downgrade), or an explicit `Fatal`. It leaves as `Fatal` with a one-line reason, which the command
  line prints (`fatal_reason`) instead of a traceback.
"""

from __future__ import annotations

import errno as errno_mod
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0
MIN_BACKOFF_S = 0.05


class Fatal(Exception):
    """An unrecoverable local fault: the daemon stops (unmounting cleanly) with this reason."""


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def kind_of(exc: BaseException) -> str:
    """A short, stable name for what went wrong: the exception type, with its errno if it has one
    (the first one of an exception group)."""
    leaf = next(_leaves(exc), exc)
    code = getattr(leaf, "errno", None)
    name = type(leaf).__name__
    if isinstance(code, int) and code:
        return f"{name} {errno_mod.errorcode.get(code, str(code))}"
    return name


def is_fatal(exc: BaseException) -> bool:
    """Faults of this node itself that no retry repairs: the daemon has to stop."""
    from awsomefsd.meta.errors import STORE_FAILURES, LogAheadOfBuild

    return any(isinstance(leaf, (Fatal, LogAheadOfBuild, *STORE_FAILURES, MemoryError)) for leaf in _leaves(exc))


def fatal_reason(exc: BaseException) -> str | None:
    """The one-line reason of a `Fatal` inside `exc` (an exception group from trio.run), if any."""
    from awsomefsd.meta.errors import LogAheadOfBuild

    for leaf in _leaves(exc):
        if isinstance(leaf, (Fatal, LogAheadOfBuild)):
            return str(leaf)
    return None


def one_line(exc: BaseException) -> str:
    leaf = next(_leaves(exc), exc)
    text = str(leaf).strip().splitlines()
    return f"{type(leaf).__name__}: {text[0] if text else ''}".rstrip(": ")


class DutyBook:
    """Errors of one node's duties: counted per (duty, kind), each kind logged once per outage."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self.errors: dict[tuple[str, str], int] = {}
        self.failing: dict[str, set[str]] = {}  # duty -> kinds logged since its last success
        self.restarts = 0

    def failed(self, duty: str, exc: BaseException) -> None:
        kind = kind_of(exc)
        self.errors[duty, kind] = self.errors.get((duty, kind), 0) + 1
        seen = self.failing.setdefault(duty, set())
        if kind in seen:
            log.debug("%s: %s failed again: %s", self.node, duty, one_line(exc))
            return
        seen.add(kind)
        expected = _expected(exc)
        log.warning("%s: %s failed (%s); it goes on after a back-off%s", self.node, duty, one_line(exc),
                    "" if expected else " (unexpected: traceback follows)", exc_info=None if expected else exc)

    def succeeded(self, duty: str) -> None:
        kinds = self.failing.pop(duty, None)
        if kinds:
            log.info("%s: %s works again (after %s)", self.node, duty, ", ".join(sorted(kinds)))

    def total(self, duty: str | None = None) -> int:
        return sum(n for (d, _), n in self.errors.items() if duty is None or d == duty)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("awsomefs_duty_errors", "errors in background duties, by duty and kind",
                                     labels=["duty", "kind"])
        for (duty, kind), count in sorted(self.errors.items()):
            family.add_metric([duty, kind], count)
        yield family


def _expected(exc: BaseException) -> bool:
    """Errors a fault is known to produce (no traceback needed to understand them)."""
    import grpc

    from awsomefsd.meta.errors import FsError
    from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout

    expected = (FsError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                grpc.RpcError, NotLeader, ProposalLost, ProposalTimeout, TimeoutError)
    return all(isinstance(leaf, expected) for leaf in _leaves(exc))


def _check_fatal(duty: str, exc: BaseException) -> None:
    if is_fatal(exc):
        reason = fatal_reason(exc) or f"{duty}: {one_line(exc)}"
        raise Fatal(reason) from exc


async def run_duty(name: str, step: Callable[[], Awaitable[float | None]], *, book: DutyBook,
                   period_s: float, max_backoff_s: float = MAX_BACKOFF_S,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run `step()` for ever: after each success wait what it returned (None: `period_s`); after an
    error log it (once per kind), count it and back off (doubling, at most `max_backoff_s`: a duty
    with a deadline of its own, like lease renewal, keeps its cadence)."""
    task_status.started()
    backoff_s = max(period_s, MIN_BACKOFF_S)
    while True:
        try:
            delay = await step()
        except Exception as exc:
            _check_fatal(name, exc)
            book.failed(name, exc)
            await trio.sleep(min(backoff_s, max_backoff_s))
            backoff_s = min(backoff_s * 2, max_backoff_s)
            continue
        book.succeeded(name)
        backoff_s = max(period_s, MIN_BACKOFF_S)
        await trio.sleep(period_s if delay is None else max(0.0, delay))


async def retry_until_done(name: str, step: Callable[[], Awaitable[Any]], *, book: DutyBook,
                           period_s: float = 1.0) -> None:
    """A one-off duty (e.g. recording a new address): tried until it succeeds once, its errors
    handled as `run_duty`'s."""
    backoff_s = max(period_s, MIN_BACKOFF_S)
    while True:
        try:
            await step()
        except Exception as exc:
            _check_fatal(name, exc)
            book.failed(name, exc)
            await trio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
            continue
        book.succeeded(name)
        return


async def supervise(name: str, loop: Callable[..., Awaitable[Any]], *, book: DutyBook,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a long-lived loop (`loop(task_status=...)`, started like a nursery task) and start it
    again after it fails, with the same logging, counting and back-off as `run_duty`. Returns when
    the loop returns by itself."""
    started = False
    backoff_s = MIN_BACKOFF_S
    while True:
        ran_since = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(loop)
                if not started:
                    started = True
                    task_status.started()
            return
        except Exception as exc:
            _check_fatal(name, exc)
            if trio.current_time() - ran_since > MAX_BACKOFF_S:
                book.failing.pop(name, None)  # it ran fine for a while: a new outage, logged anew
                backoff_s = MIN_BACKOFF_S
            book.failed(name, exc)
            book.restarts += 1
        if not started:  # failed before it was ready: the caller must not wait for ever
            started = True
            task_status.started()
        await trio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)


__all__ = ["DutyBook", "Fatal", "fatal_reason", "is_fatal", "kind_of", "one_line", "retry_until_done", "run_duty",
           "supervise"]
