"""Read-only opening: `walasync.open(path, readonly=True)` beside a writer."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import segment_files, small

import walasync
from walasync import CorruptionError, FileIO, Record, TruncatedError, WalError, WrongLoopError


class NeverWrites(FileIO):
    """An I/O layer that fails the test on any call that could change a file."""

    def open(self, path: str, *, create: bool = False) -> int:
        raise AssertionError(f"opened {path} for writing")

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        raise AssertionError("wrote")

    def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        raise AssertionError("wrote")

    def truncate(self, fd: int, size: int) -> None:
        raise AssertionError("truncated")

    def rename(self, src: str, dst: str) -> None:
        raise AssertionError("renamed")

    def unlink(self, path: str) -> None:
        raise AssertionError("unlinked")

    def makedirs(self, path: str) -> list[str]:
        raise AssertionError("made a directory")

    def fsync_dir(self, path: str) -> None:
        raise AssertionError("fsynced a directory")

    def fdatasync(self, fd: int) -> None:
        raise AssertionError("fdatasync")

    def lock(self, fd: int) -> None:
        raise AssertionError("locked")


def data(i: int) -> bytes:
    return b"r%d|" % i + bytes(i % 300)


async def test_reads_what_the_writer_wrote_without_writing(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(1, 101):
            await wal.append(data(i))
        async with walasync.open(log_dir, readonly=True, io=NeverWrites()) as ro:
            assert isinstance(ro, walasync.ReadOnlyWal)
            assert (ro.first_lsn, ro.last_lsn) == (1, 100)
            assert [r async for r in ro.read(40, 60)] == [Record(i, data(i)) for i in range(40, 61)]
            await wal.append(b"more")  # the writer goes on: a new read looks again
            assert [r.lsn async for r in ro.read(100)] == [100, 101]
            assert ro.last_lsn == 101


async def test_a_torn_tail_is_where_reading_stops_and_stays(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(1, 11):
            await wal.append(b"rec-%d" % i)  # no zeros at its end: the data ends at `end`
    last = segment_files(log_dir)[-1]
    raw = bytearray(last.read_bytes())
    end = len(raw.rstrip(b"\0"))
    raw[end + 8 : end + 40] = b"\x57\x4c\x42\x31" + b"\xee" * 28  # a torn batch
    last.write_bytes(bytes(raw))
    async with walasync.open(log_dir, readonly=True, io=NeverWrites()) as ro:
        assert ro.last_lsn == 10
        assert [r.lsn async for r in ro.read()] == list(range(1, 11))
    assert last.read_bytes() == bytes(raw)  # not repaired: a reader never writes


async def test_a_last_segment_without_a_valid_header_is_where_reading_stops(
    log_dir: Path,
) -> None:
    """As a torn tail: the data ends before it for now (a writer never shows one, so it
    is damage, which `verify` reports; a reader goes on with everything before it)."""
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(1, 101):
            await wal.append(data(i))
    *_, last = segment_files(log_dir)
    assert len(segment_files(log_dir)) > 2
    first = int(last.stem)
    last.write_bytes(last.read_bytes()[:10])
    async with walasync.open(log_dir, readonly=True, io=NeverWrites()) as ro:
        assert ro.last_lsn == first - 1
        assert [r.lsn async for r in ro.read()] == list(range(1, first))
        last.write_bytes(b"\xff" * 64)  # garbage, still: the same view at the next look
        assert await ro.refresh() == first - 1
    for segment in segment_files(log_dir)[:-1]:
        segment.unlink()
    with pytest.raises(CorruptionError, match="bad magic"):  # nothing before it
        await walasync.open(log_dir, readonly=True)


async def test_missing_directory_and_non_logs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WalError, match="no walasync log"):
        await walasync.open(tmp_path / "nothing", readonly=True)
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptionError, match="not a walasync log"):
        await walasync.open(tmp_path / "empty", readonly=True)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(WalError):
        await walasync.open(tmp_path / "file", readonly=True)
    with pytest.raises(ValueError):
        walasync.open("", readonly=True)


async def test_follow_sees_appends_rotations_and_stops_at_close(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await wal.append(data(1))
        ro = await walasync.open(log_dir, readonly=True, poll_interval=0.002)
        got: list[Record] = []
        all_in = asyncio.Event()

        async def follower() -> None:
            async for rec in ro.read(follow=True):
                got.append(rec)
                if len(got) == 200:
                    all_in.set()

        task = asyncio.ensure_future(follower())
        for i in range(2, 201):
            await wal.append(data(i))
        await asyncio.wait_for(all_in.wait(), 30)
        await ro.close()
        await asyncio.wait_for(task, 10)
        assert got == [Record(i, data(i)) for i in range(1, 201)]
        assert len(segment_files(log_dir)) > 3


async def test_follow_until_end(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        async with walasync.open(log_dir, readonly=True, poll_interval=0.002) as ro:
            task = asyncio.ensure_future(_collect(ro.read(1, 30, follow=True)))
            for i in range(1, 51):
                await wal.append(data(i))
            assert [r.lsn for r in await asyncio.wait_for(task, 10)] == list(range(1, 31))


async def _collect(it: object) -> list[Record]:
    return [r async for r in it]  # type: ignore[attr-defined]


async def test_the_writer_truncating_under_a_reader(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(1, 301):
            await wal.append(data(i))
        async with walasync.open(log_dir, readonly=True) as ro:
            behind = ro.read(1)
            assert (await behind.__anext__()).lsn == 1
            await wal.truncate_front(200)
            with pytest.raises(TruncatedError):
                async for _ in behind:
                    pass
            assert [r.lsn async for r in ro.read()] == list(range(200, 301))
            assert ro.first_lsn == 200
            with pytest.raises(TruncatedError):
                _ = [r async for r in ro.read(150)]
            cut = ro.read(250)
            assert (await cut.__anext__()).lsn == 250
            await wal.truncate_back(260)
            for i in range(261, 300):
                await wal.append(b"new %d" % i)
            with pytest.raises(TruncatedError):
                async for _ in cut:
                    pass
            got = [r async for r in ro.read(255)]
            assert [r.data for r in got] == [data(i) for i in range(255, 261)] + [
                b"new %d" % i for i in range(261, 300)
            ]


async def test_from_another_loop_is_typed(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"x")
        async with walasync.open(log_dir, readonly=True) as ro:
            with pytest.raises(WrongLoopError):
                await asyncio.to_thread(asyncio.run, ro.refresh())


READER = """
import asyncio, sys, walasync
async def main():
    async with walasync.open(sys.argv[1], readonly=True, poll_interval=0.002) as ro:
        n = 0
        async for rec in ro.read(follow=True, end=int(sys.argv[2])):
            assert rec.data == b"r%d|" % rec.lsn + bytes(rec.lsn % 300), rec
            n += 1
        print(n, ro.last_lsn)
asyncio.run(main())
"""


async def test_a_reader_in_another_process_follows_the_writer(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await wal.append(data(1))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            READER,
            str(log_dir),
            "500",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(2, 501):
            await wal.append(data(i))
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    n, last = map(int, out.split())
    assert n == 500 and last >= 500
