"""The write buffer's accounting of the space its bytes will need (awsomefsd/fs/buffer.py)."""

from __future__ import annotations

from awsomefsd.fs.buffer import WriteBuffer
from awsomefsd.io.layout import BLOCK_SIZE


def test_runs_a_flush_took_count_as_needed_until_the_flush_ends() -> None:
    """A flush takes a file's runs, then reads the blocks around partial ones before it allocates:
    meanwhile a write checked for room must still see those runs' need, or it is promised blocks
    the flush is about to take (and its own flush later fails with ENOSPC)."""
    buffer = WriteBuffer(file_buffer_bytes=8 << 20, write_buffer_bytes=64 << 20, clock_ns=lambda: 0)
    st = buffer.state(5)
    buffer.put(st, 0, bytes(10 * BLOCK_SIZE))
    needed = buffer.dirty_blocks()
    assert needed >= 10
    buffer.take(st)
    assert buffer.total_dirty_bytes == 0 and buffer.dirty_blocks() == needed
    buffer.put(st, 20 * BLOCK_SIZE, bytes(BLOCK_SIZE))  # written during the flush
    assert buffer.dirty_blocks() == needed + 1
    buffer.flushed(st)
    assert buffer.inflight_bytes == 0 and buffer.dirty_blocks() == needed + 1 - 10
