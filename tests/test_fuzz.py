"""Hostile input: whatever bytes sit in a log directory, opening and reading end in a clean
recovery or a `CorruptionError`; never another exception, a hang, or a huge allocation."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walasync
from walasync import FileIO
from walasync import _format as fmt

SALT = 0x5EED
NAME = "00000000000000000001.wal"


def batch(first_lsn: int, records: list[bytes]) -> bytes:
    return b"".join(fmt.encode_batch(first_lsn, records, SALT))


# Bodies that are mostly plausible: valid batches, spliced with garbage and cut anywhere.
chunks = st.one_of(
    st.binary(max_size=200),
    st.lists(st.binary(max_size=64), min_size=1, max_size=5).map(lambda r: batch(1, r)),
    st.builds(
        lambda n: struct.pack("<IIIIQ", fmt.BATCH_MAGIC, 0, n, 1, 1), st.integers(0, 2**32 - 1)
    ),
    st.just(bytes(64)),
)
bodies = st.lists(chunks, max_size=6).map(b"".join)
headers = st.one_of(
    st.just(fmt.encode_segment_header(1, SALT)),
    st.binary(min_size=0, max_size=40),
    st.integers(0, 2**16 - 1).map(
        lambda v: fmt.encode_segment_header(1, SALT)[:8] + v.to_bytes(2, "little") + bytes(22)
    ),
)


async def open_and_read(path: Path) -> list[walasync.Record]:
    try:
        async with walasync.open(path, segment_size=4096) as wal:
            records = [r async for r in wal.read()]
            assert [r.lsn for r in records] == list(range(1, wal.last_lsn + 1))
            lsn = await wal.append(b"after")  # a recovered log takes appends
            assert lsn == wal.last_lsn
            return records
    except walasync.CorruptionError as exc:
        assert exc.path.endswith(".wal") and exc.offset >= 0
        return []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, body=bodies, sealed=st.booleans())
def test_any_segment_bytes_recover_cleanly_or_raise_corruption(
    header: bytes, body: bytes, sealed: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        log.mkdir()
        (log / NAME).write_bytes(header + body)
        if sealed:  # the fuzzed file is a sealed segment, followed by a valid last one
            last = fmt.encode_segment_header(3, SALT) + batch(3, [b"x"])
            (log / "00000000000000000003.wal").write_bytes(last)
        asyncio.run(open_and_read(log))


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1 << 20, 2**32 - 1), count=st.integers(1, 2**32 - 1))
def test_a_huge_length_field_allocates_nothing_large(length: int, count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        log.mkdir()
        head = struct.pack("<IIIIQ", fmt.BATCH_MAGIC, 0, length, count, 1)
        (log / NAME).write_bytes(fmt.encode_segment_header(1, SALT) + head + bytes(100))
        tracemalloc.start()
        try:
            asyncio.run(open_and_read(log))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2 << 20


async def test_a_directory_that_cannot_be_written_is_a_wal_error(log_dir: Path) -> None:
    class ReadOnly(FileIO):
        def open(self, path: str, *, create: bool = False) -> int:
            raise PermissionError(errno.EACCES, "Permission denied", path)

    with pytest.raises(walasync.WalError, match="opening") as info:
        await walasync.open(log_dir, io=ReadOnly())
    assert isinstance(info.value.__cause__, PermissionError)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    tmp_path.chmod(0o500)
    yield tmp_path
    tmp_path.chmod(0o700)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_a_read_only_directory_is_a_wal_error(read_only_dir: Path) -> None:
    with pytest.raises(walasync.WalError):
        await walasync.open(read_only_dir / "log")
