"""Background duties (awsomefsd/duty.py): a step run in a loop survives every error a fault can
produce, logs each kind once, counts it and backs off; only an unrecoverable local fault ends it,
as `Fatal` with a one-line reason. (A refused proposal in the delayed-free reclaimer, after a pause
past the node's lease, used to end the whole daemon.)"""

from __future__ import annotations

import errno
import itertools
import logging

import grpc
import lmdb
import pytest
import trio
import trio.testing

from awsomefsd.duty import DutyBook, Fatal, fatal_reason, kind_of, retry_until_done, run_duty, supervise
from awsomefsd.io.fence import WriteFencedError
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.replication.errors import ProposalTimeout

FAULTS: list[BaseException] = [
    FsError(errno.EIO, "node 2's lease epoch 1 has expired"),
    FsError(errno.ENOSPC),
    WriteFencedError("fenced"),
    trio.BrokenResourceError("stream broke"),
    trio.ClosedResourceError("closed"),
    ProposalTimeout("entry 7 not applied in time"),
    grpc.RpcError(),
    TimeoutError("slow"),
    ExceptionGroup("from a nursery", [FsError(errno.EIO, "inner")]),
    KeyError("a bug: logged with its traceback, and the duty goes on"),
]


async def test_a_duty_survives_every_fault_and_logs_each_kind_once(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="awsomefsd.duty")
    book = DutyBook("node 7")
    script = [*FAULTS, *FAULTS]  # every fault twice: logged once each
    steps = 0

    async def step() -> None:
        nonlocal steps
        steps += 1
        if script:
            raise script.pop(0)

    with trio.move_on_after(120):
        await run_duty("test duty", step, book=book, period_s=0.1)
    assert steps > 2 * len(FAULTS)
    assert book.total("test duty") == 2 * len(FAULTS)
    assert book.errors["test duty", "FsError EIO"] == 4  # two plain, two inside an exception group
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len({kind_of(f) for f in FAULTS}), warnings
    assert all(w.startswith("node 7: test duty failed") for w in warnings)
    assert any("works again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "awsomefs_duty_errors" in {m.name for m in book.collect()}


async def test_the_back_off_grows_and_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []

    async def step() -> None:
        times.append(trio.current_time())
        raise FsError(errno.EIO)

    with trio.move_on_after(30):
        await run_duty("failing", step, book=DutyBook(), period_s=0.1, max_backoff_s=2.0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] == pytest.approx(0.1) and gaps[1] == pytest.approx(0.2)
    assert max(gaps) == pytest.approx(2.0)


@pytest.mark.parametrize("error", [lmdb.Error("MDB_PANIC"), MemoryError(), Fatal("the device is gone")])
async def test_an_unrecoverable_local_fault_ends_the_duty_with_one_line(error: BaseException) -> None:
    async def step() -> None:
        raise error

    with pytest.raises(Fatal) as ended:
        await run_duty("store", step, book=DutyBook(), period_s=0.1)
    reason = fatal_reason(ended.value)
    assert reason is not None and "\n" not in reason


async def test_a_supervised_loop_is_started_again(autojump_clock: trio.testing.MockClock) -> None:
    book = DutyBook()
    runs = 0

    async def loop(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        if runs < 4:
            raise trio.BrokenResourceError("its channel broke")

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: supervise("looper", loop, book=book, task_status=task_status))
    assert runs == 4 and book.restarts == 3


async def test_a_one_off_duty_is_retried_until_done(autojump_clock: trio.testing.MockClock) -> None:
    tries = 0

    async def step() -> None:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise FsError(errno.EIO, "no leader")

    await retry_until_done("address update", step, book=DutyBook(), period_s=0.5)
    assert tries == 3
