"""The blocking-call guard itself: it must catch a blocking syscall made by walasync on
the event loop thread, or the rest of the suite proves nothing about it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from blockbuster import BlockingError

import walasync
from walasync import FileIO


async def test_guard_catches_fdatasync_on_the_loop(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(BlockingError):
            FileIO().fdatasync(fd)
    finally:
        os.close(fd)


async def test_append_path_makes_no_blocking_call_on_the_loop(log_dir: Path) -> None:
    async with walasync.open(log_dir, segment_size=4096) as wal:
        for i in range(50):  # crosses several segments: rotation is on the path too
            await wal.append(b"%d" % i * 40)
        assert [r.lsn async for r in wal.read()] == list(range(1, 51))
        await wal.sync()
