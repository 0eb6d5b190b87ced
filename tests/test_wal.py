"""The public API of `Wal`: open, append, append_many, read, sync, close, errors."""

from __future__ import annotations

import asyncio
import errno
import gc
import threading
from pathlib import Path

import pytest
from conftest import LOOPS, loops, run, segment_files, small, until

import walasync
from walasync import ClosedError, FileIO, Record, RecordTooLargeError, WalError, WrongLoopError


async def test_open_creates_nested_directory_and_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "log"
    async with walasync.open(path) as wal:
        assert (wal.first_lsn, wal.last_lsn, wal.synced_lsn) == (1, 0, 0)
        assert wal.path == str(path)
        assert [r async for r in wal.read()] == []
    assert [p.name for p in segment_files(path)] == ["00000000000000000001.wal"]


async def test_open_is_awaitable_and_close_is_idempotent(log_dir: Path) -> None:
    wal = await walasync.open(log_dir)
    assert await wal.append(b"x") == 1
    await wal.close()
    await wal.close()
    await asyncio.gather(wal.close(), wal.close())
    assert wal.closed and "closed" in repr(wal)  # closed through, not just begun
    async with walasync.open(log_dir) as again:  # the lock was released, the record kept
        assert again.last_lsn == 1


async def test_append_returns_dense_lsns_and_read_returns_them(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        lsns = [await wal.append(b"record %d" % i) for i in range(10)]
        assert lsns == list(range(1, 11))
        assert wal.last_lsn == wal.synced_lsn == 10
        records = [r async for r in wal.read()]
    assert records == [Record(i, b"record %d" % (i - 1)) for i in range(1, 11)]


async def test_concurrent_appends_get_distinct_dense_lsns_in_file_order(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        datas = [b"%05d" % i * (i % 7) for i in range(2000)]
        lsns = await asyncio.gather(*(wal.append(d) for d in datas))
        assert sorted(lsns) == list(range(1, 2001))
        by_lsn = {r.lsn: r.data async for r in wal.read()}
    assert {lsn: by_lsn[lsn] for lsn in lsns} == dict(zip(lsns, datas, strict=True))


async def test_bytes_like_records_are_copied(log_dir: Path) -> None:
    buf = bytearray(b"abc")
    async with walasync.open(log_dir) as wal:
        task = asyncio.ensure_future(wal.append(buf))
        await asyncio.sleep(0)  # the append has started: it holds its own copy
        buf[:] = b"xyz"  # so mutating the buffer now does not change what is logged
        await task
        await wal.append(memoryview(b"0123456789")[2:5])
        await wal.append(memoryview(bytearray(b"\x01\x00\x00\x00")).cast("I"))
        await wal.append(b"")
        got = [r.data async for r in wal.read()]
    assert got == [b"abc", b"234", b"\x01\x00\x00\x00", b""]
    assert all(type(d) is bytes for d in got)


@pytest.mark.parametrize("bad", ["text", 12, None, [b"a"], object()])
async def test_non_bytes_record_is_a_type_error_and_loses_nothing(
    log_dir: Path, bad: object
) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"kept")
        with pytest.raises(TypeError, match="bytes"):
            await wal.append(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await wal.append_many([b"ok", bad])  # type: ignore[list-item]
        assert await wal.append(b"after") == 2
    async with walasync.open(log_dir) as wal:
        assert [r.data async for r in wal.read()] == [b"kept", b"after"]


async def test_record_too_large(log_dir: Path) -> None:
    async with walasync.open(log_dir, max_record_size=100) as wal:
        assert await wal.append(b"x" * 100) == 1
        with pytest.raises(RecordTooLargeError, match="max_record_size"):
            await wal.append(b"x" * 101)
        with pytest.raises(RecordTooLargeError):
            await wal.append_many([b"x" * 60, b"y" * 60])
        assert isinstance(RecordTooLargeError("x"), ValueError)
        assert await wal.append(b"ok") == 2
        assert [r.data async for r in wal.read()] == [b"x" * 100, b"ok"]


async def test_records_larger_than_a_segment(log_dir: Path) -> None:
    big = [bytes([i]) * (10_000 + i) for i in range(5)]
    async with walasync.open(log_dir, **small()) as wal:
        for b in big:
            await wal.append(b)
            await wal.append(b"small")
    async with walasync.open(log_dir, **small()) as wal:
        got = [r.data async for r in wal.read()]
    assert got == [x for b in big for x in (b, b"small")]


async def test_append_many_returns_a_range_and_keeps_order(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        assert await wal.append(b"a") == 1
        r = await wal.append_many([b"b", bytearray(b"c"), b"d"])
        assert r == range(2, 5)
        assert await wal.append_many([]) == range(5, 5)
        assert await wal.append(b"e") == 5
        assert [x.data async for x in wal.read()] == [b"a", b"b", b"c", b"d", b"e"]


async def test_append_many_is_one_batch_even_when_larger_than_max_batch_bytes(
    log_dir: Path,
) -> None:
    records = [b"%04d" % i * 25 for i in range(100)]  # 10 KB over a 1 KB batch limit
    async with walasync.open(log_dir, max_batch_bytes=1024, **small()) as wal:
        r = await wal.append_many(records)
        assert len(r) == 100
    # One batch means one frame: the segment holding it has exactly one batch header.
    seg = segment_files(log_dir)[0].read_bytes()
    from walasync import _format as fmt

    head = fmt.parse_batch_header(seg, fmt.SEGMENT_HEADER)
    assert head is not None and head.nrecords == 100


async def test_read_ranges_and_read_your_writes(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(1, 301):
            lsn = await wal.append(b"%d" % i * 10)
            if i % 37 == 0:  # read-your-writes: the record is visible at once
                assert [r async for r in wal.read(start=lsn)] == [Record(lsn, b"%d" % i * 10)]
        assert [r.lsn async for r in wal.read(start=100, end=105)] == list(range(100, 106))
        assert [r.lsn async for r in wal.read(start=299, end=10_000)] == [299, 300]
        assert [r async for r in wal.read(start=301)] == []
        assert [r async for r in wal.read(start=50, end=49)] == []
        with pytest.raises(ValueError, match="start"):
            wal.read(start=0)


async def test_read_sees_a_snapshot_while_appends_continue(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await asyncio.gather(*(wal.append(b"%d" % i) for i in range(200)))
        reader = wal.read()
        more = asyncio.gather(*(wal.append(b"late") for _ in range(200)))
        seen = [r.lsn async for r in reader]
        await more
        assert seen == list(range(1, 201))


async def test_many_segments_reopen_append_read_cycles(log_dir: Path) -> None:
    expected: list[bytes] = []
    for cycle in range(5):
        async with walasync.open(log_dir, **small()) as wal:
            assert wal.last_lsn == len(expected)
            batch = [b"c%d-%d-" % (cycle, i) * 20 for i in range(120)]
            await asyncio.gather(*(wal.append(b) for b in batch[:60]))
            await wal.append_many(batch[60:])
            expected_now = [r.data async for r in wal.read()]
        assert expected_now[: len(expected)] == expected
        assert sorted(expected_now[len(expected) :]) == sorted(batch)
        expected = expected_now
    assert len(segment_files(log_dir)) > 5


async def test_use_after_close_raises_closed_error(log_dir: Path) -> None:
    wal = await walasync.open(log_dir)
    await wal.close()
    with pytest.raises(ClosedError):
        await wal.append(b"x")
    with pytest.raises(ClosedError):
        await wal.append_many([b"x"])
    with pytest.raises(ClosedError):
        await wal.append_many([])
    with pytest.raises(ClosedError):
        wal.read()
    with pytest.raises(ClosedError):
        await wal.sync()
    assert "closed" in repr(wal)


async def test_path_that_is_a_file_is_a_wal_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a directory")
    with pytest.raises(WalError, match="opening") as info:
        await walasync.open(tmp_path / "file")
    assert isinstance(info.value.__cause__, OSError)


async def test_bad_options_are_rejected(log_dir: Path) -> None:
    for bad in (
        {"segment_size": 100},
        {"max_batch_bytes": 0},
        {"max_pending_bytes": -1},
        {"max_batch_delay": -1.0},
        {"sync_interval": 0},
        {"durability": "sometimes"},
        {"segment_size": "big"},
    ):
        with pytest.raises(ValueError):
            walasync.open(log_dir, **bad)
    with pytest.raises(TypeError):
        walasync.open(log_dir, no_such_option=1)  # type: ignore[call-overload]


async def test_use_from_another_event_loop_is_a_typed_error(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"a")
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                asyncio.run(wal.append(b"b"))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        assert len(errors) == 1 and isinstance(errors[0], WrongLoopError)
        assert await wal.append(b"c") == 2


@loops
def test_use_from_another_loop_on_the_same_thread_is_typed(loop: str, log_dir: Path) -> None:
    own = LOOPS[loop]()
    try:
        wal = own.run_until_complete(walasync.open(log_dir))
        own.run_until_complete(wal.append(b"a"))
        with pytest.raises(WrongLoopError):  # `own` is not running: another loop is
            run(loop, wal.append(b"b"))
        assert own.run_until_complete(wal.append(b"c")) == 2
        own.run_until_complete(wal.close())
    finally:
        own.close()


async def test_unclosed_log_warns_and_releases_its_lock(log_dir: Path) -> None:
    wal = await walasync.open(log_dir)
    await wal.append(b"x")
    with pytest.warns(ResourceWarning, match="unclosed"):
        del wal
        gc.collect()
    # The I/O thread closes the files after the warning.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30  # a hang, not a slow machine
    while True:
        try:
            async with walasync.open(log_dir) as again:
                assert again.last_lsn == 1
            break
        except walasync.LockedError:
            if loop.time() > deadline:
                pytest.fail("the lock of an unclosed, collected log was never released")
            await asyncio.sleep(0.01)


async def test_repr_shows_state(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"x")
        text = repr(wal)
        assert "open" in text and "last_lsn=1" in text and "durability=fsync" in text


async def test_a_failed_read_is_a_wal_error_and_the_log_goes_on(log_dir: Path) -> None:
    class FailingRead(FileIO):
        fail = False

        def pread(self, fd: int, size: int, offset: int) -> bytes:
            if self.fail:
                self.fail = False
                raise OSError(errno.EIO, "Input/output error")
            return super().pread(fd, size, offset)

    io = FailingRead()
    async with walasync.open(log_dir, io=io) as wal:
        await wal.append(b"x")
        io.fail = True
        with pytest.raises(WalError, match="reading") as info:
            [r async for r in wal.read()]
        assert isinstance(info.value.__cause__, OSError)
        assert [r.data async for r in wal.read()] == [b"x"]
        assert await wal.append(b"y") == 2


# -- every public method keeps the loop promise -------------------------------------------------


async def _drain(wal: walasync.Wal) -> list[Record]:
    return [r async for r in wal.read()]


async def _append(wal: walasync.Wal) -> object:
    return await wal.append(b"foreign")


async def _append_many(wal: walasync.Wal) -> object:
    return await wal.append_many([b"foreign"])


async def _append_none(wal: walasync.Wal) -> object:
    return await wal.append_many([])


async def _sync(wal: walasync.Wal) -> None:
    await wal.sync()


async def _close(wal: walasync.Wal) -> None:
    await wal.close()


async def _context(wal: walasync.Wal) -> object:
    async with wal:
        return None


FOREIGN = {
    "append": _append,
    "append_many": _append_many,
    "append_many_empty": _append_none,
    "read": _drain,
    "sync": _sync,
    "close": _close,
    "async_with": _context,
}


class Appenders:
    """Coroutines appending on the owner's loop until stopped; every append must succeed."""

    def __init__(self, wal: walasync.Wal, n: int) -> None:
        self.stop = False
        self.acked: list[int] = []
        self.tasks = [asyncio.ensure_future(self._run(wal)) for _ in range(n)]

    async def _run(self, wal: walasync.Wal) -> None:
        while not self.stop:
            self.acked.append(await wal.append(b"owner"))

    async def finish(self) -> None:
        self.stop = True
        await asyncio.gather(*self.tasks)  # raises if any append failed


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
@pytest.mark.parametrize("method", list(FOREIGN))
async def test_every_method_from_another_thread_is_a_wrong_loop_error(
    log_dir: Path, method: str, busy: bool
) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"first")
        owner = Appenders(wal, 100 if busy else 0)
        await until(lambda: owner.acked or not busy, "the owner's appenders at work")
        with pytest.raises(WrongLoopError):
            await asyncio.to_thread(asyncio.run, FOREIGN[method](wal))
        assert not wal.closed and "open" in repr(wal)
        await owner.finish()
        assert await wal.append(b"after") == wal.last_lsn
        await wal.sync()
    assert wal.closed
    assert sorted(owner.acked) == list(range(2, 2 + len(owner.acked)))
    async with walasync.open(log_dir) as wal:
        assert [r.data for r in await _drain(wal)] == [
            b"first",
            *[b"owner"] * len(owner.acked),
            b"after",
        ]


@loops
@pytest.mark.parametrize("method", list(FOREIGN))
def test_every_method_from_another_loop_on_the_same_thread_is_typed(
    loop: str, method: str, log_dir: Path
) -> None:
    own = LOOPS[loop]()
    try:
        wal = own.run_until_complete(walasync.open(log_dir))
        own.run_until_complete(wal.append(b"a"))
        with pytest.raises(WrongLoopError):  # `own` is not running: another loop is
            run(loop, FOREIGN[method](wal))
        assert own.run_until_complete(wal.append(b"c")) == 2
        own.run_until_complete(wal.close())
    finally:
        own.close()


def test_read_without_any_running_loop_is_typed(log_dir: Path) -> None:
    own = asyncio.new_event_loop()
    try:
        wal = own.run_until_complete(walasync.open(log_dir))
        with pytest.raises(WrongLoopError):
            wal.read()
        own.run_until_complete(wal.close())
    finally:
        own.close()


# -- bad paths and full disks at open -------------------------------------------------------


async def test_empty_path_is_a_value_error_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        walasync.open("")
    with pytest.raises(ValueError, match="empty"):
        walasync.open(b"".decode())
    assert not segment_files(tmp_path) and not (tmp_path / "LOCK").exists()


class NoRoomIO(FileIO):
    """A disk with no room for a new file's blocks."""

    def preallocate(self, fd: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_no_room_for_the_first_segment_is_a_disk_full_error(log_dir: Path) -> None:
    with pytest.raises(walasync.DiskFullError) as info:
        await walasync.open(log_dir, io=NoRoomIO())
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert str(log_dir) in str(info.value)
    assert not segment_files(log_dir)
    async with walasync.open(log_dir) as wal:  # once there is room, it opens as new
        assert await wal.append(b"x") == 1


async def test_appends_once_close_has_begun_raise_closed_error(log_dir: Path) -> None:
    wal = await walasync.open(log_dir)
    assert await wal.append(b"before") == 1
    closing = asyncio.ensure_future(wal.close())
    try:
        await asyncio.sleep(0)  # close() runs first: it has begun
        assert wal.closed and "closing" in repr(wal)
        with pytest.raises(ClosedError):
            await wal.sync()
        with pytest.raises(ClosedError):
            await wal.append(b"late")
        with pytest.raises(ClosedError):
            await wal.append_many([b"late"])
    finally:
        await closing
    async with walasync.open(log_dir) as wal:
        assert wal.last_lsn == 1
