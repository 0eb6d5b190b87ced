"""Preallocation of segment files (`FileIO.preallocate`): fallocate(2) where the file
system has it, a sparse file where it does not, never glibc's block-by-block emulation."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from conftest import segment_files

import walasync
from walasync import FileIO

MiB = 1 << 20


class NoFallocateIO(FileIO):
    """A file system without fallocate(2), as some FUSE and NFS file systems are."""

    def fallocate(self, fd: int, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


class FullIO(FileIO):
    def fallocate(self, fd: int, size: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(autouse=True)
def no_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's posix_fallocate writes every 4 KiB block where fallocate is missing (7.5 s
    for 64 MiB on a FUSE file system): walasync must never call it."""

    def refuse(*args: object) -> None:
        raise AssertionError("posix_fallocate called")

    monkeypatch.setattr(os, "posix_fallocate", refuse)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_fallocate_allocates_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        FileIO().preallocate(fd, 8 * MiB)
    finally:
        os.close(fd)
    assert path.stat().st_size == 8 * MiB
    assert allocated(path) >= 8 * MiB  # blocks reserved: a full disk shows up here, not later
    assert path.read_bytes() == bytes(8 * MiB)


def test_without_fallocate_the_file_is_sparse(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        NoFallocateIO().preallocate(fd, 8 * MiB)
        NoFallocateIO().preallocate(fd, 4 * MiB)  # never shrinks
    finally:
        os.close(fd)
    assert path.stat().st_size == 8 * MiB
    assert allocated(path) < MiB
    assert path.read_bytes() == bytes(8 * MiB)


def test_a_full_disk_is_not_mistaken_for_a_missing_fallocate(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as info:
            FullIO().preallocate(fd, MiB)
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC


async def test_no_room_at_open_is_a_disk_full_error(log_dir: Path) -> None:
    with pytest.raises(walasync.DiskFullError):
        await walasync.open(log_dir, io=FullIO())


async def test_a_log_on_a_file_system_without_fallocate(log_dir: Path) -> None:
    io = NoFallocateIO()
    assert io.leaves_unwritten()  # holes cost a durable write too: zeros go ahead of it
    size = 16 * MiB
    record = bytes(range(256)) * 256  # 64 KiB
    async with walasync.open(log_dir, io=io, segment_size=size) as wal:
        (first,) = segment_files(log_dir)
        assert first.stat().st_size == size
        # Only the header's block and the zeros written ahead (at most a few MiB) exist.
        assert allocated(first) <= 6 * MiB
        for _ in range(3):
            await append_concurrently(wal, record, 200)  # 3 x 12.5 MiB: rotates twice
        assert len(segment_files(log_dir)) == 3
        assert wal.last_lsn == 600
    async with walasync.open(log_dir, io=io, segment_size=size) as wal:
        assert [r.lsn async for r in wal.read()] == list(range(1, 601))
        assert {r.data async for r in wal.read()} == {record}


async def append_concurrently(wal: walasync.Wal, record: bytes, n: int) -> None:
    await asyncio.gather(*(wal.append(record) for _ in range(n)))
