"""Zeros written ahead of the writer: never over a record, and only an optimisation."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import walasync
from walasync import FileIO
from walasync._zeroing import CALM


def _on_zero_thread() -> bool:
    return threading.current_thread().name == "walasync-prealloc-zero"


class SlowZeros(FileIO):
    """Real files, with each write of zeros held for a while before it lands (or failing),
    so that the writer reaches the chunk being zeroed."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.zero_writes = 0

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        if _on_zero_thread():
            self.zero_writes += 1
            if self.fail:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            time.sleep(0.003)
        super().pwritev(fd, buffers, offset)


def _records(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes([i % 251]) * rng.randrange(1, 30_000) for i in range(count)]


async def _append_calmly(wal: walasync.Wal, records: list[bytes]) -> None:
    """One appender (no pressure, so zeroing runs), pausing now and then for it to start."""
    for i, data in enumerate(records):
        if i % 40 == 0:
            await asyncio.sleep(CALM * 1.5)
        await wal.append(data)


async def test_zeros_never_land_on_records(log_dir: Path) -> None:
    io = SlowZeros()
    records = _records(7, 300)
    async with walasync.open(log_dir, io=io, segment_size=1 << 20) as wal:
        await _append_calmly(wal, records)
    assert io.zero_writes > 10  # zeroing ran, across several segments
    async with walasync.open(log_dir, segment_size=1 << 20) as wal:
        assert [r.data async for r in wal.read()] == records


async def test_a_failing_zero_write_only_stops_the_zeroing(log_dir: Path) -> None:
    io = SlowZeros(fail=True)
    records = _records(8, 60)
    async with walasync.open(log_dir, io=io, segment_size=1 << 20) as wal:
        await _append_calmly(wal, records)
        assert "open" in repr(wal)
    assert io.zero_writes == 1  # tried once, then never again
    async with walasync.open(log_dir, segment_size=1 << 20) as wal:
        assert [r.data async for r in wal.read()] == records
