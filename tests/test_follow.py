"""`wal.read(follow=True)`: live following of the durable watermark.

No assertion here depends on timing: a test waits for a state (a follower registered as
waiting, a count of records) with `until`, which only bounds how long it may take.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import segment_files, small
from iofaults import ControlledIO

import walasync
from walasync import BrokenLogError, FileIO, Record, WrongLoopError


async def until(cond: Callable[[], bool], what: str = "the condition") -> None:
    """Wait for `cond()` to hold (checked every millisecond; a sleep(0) spin would starve
    the I/O thread of the GIL)."""
    for _ in range(20_000):
        if cond():
            return
        await asyncio.sleep(0.001)
    pytest.fail(f"timed out waiting for {what}")


def waiting(wal: walasync.Wal) -> int:
    """Followers registered as waiting for the watermark to move."""
    return len(wal._batcher._watchers)


class ReaderFiles(FileIO):
    """FileIO that knows which read-only files (the readers') are open, and can hold a
    reader's `open_read` or `pread` at a gate."""

    def __init__(self) -> None:
        self.open_fds: set[int] = set()
        self.reads = threading.Event()  # cleared: reader calls wait at the gate
        self.reads.set()
        self.held = threading.Event()  # set once a reader call waits at the gate
        self._lock = threading.Lock()

    def _gate(self) -> None:
        if not self.reads.is_set():
            self.held.set()
            assert self.reads.wait(30), "test gate never opened"

    def open_read(self, path: str) -> int:
        self._gate()
        fd = super().open_read(path)
        with self._lock:
            self.open_fds.add(fd)
        return fd

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if fd in self.open_fds:
            self._gate()
        return super().pread(fd, size, offset)

    def close(self, fd: int) -> None:
        with self._lock:
            self.open_fds.discard(fd)
        super().close(fd)


def payload(i: int) -> bytes:
    """Records of varied sizes, some over a third of a 4 KiB segment."""
    return b"%d:" % i + bytes([i % 251]) * (i * 37 % 1500)


async def collect(it: AsyncIterator[Record], into: list[Record]) -> None:
    async for rec in it:
        into.append(rec)  # noqa: PERF401 (one at a time: tests watch it grow)


async def test_a_follower_sees_later_appends_in_order_across_rotations(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await wal.append(payload(0))
        got: list[Record] = []
        follower = asyncio.ensure_future(collect(wal.read(follow=True), got))
        await until(lambda: waiting(wal) == 1, "the follower to wait")
        assert got == [Record(1, payload(0))]
        for i in range(1, 200):  # one at a time: a rotation every few records
            await wal.append(payload(i))
        await asyncio.gather(*(wal.append(payload(i)) for i in range(200, 400)))
        lsns = await wal.append_many([payload(i) for i in range(400, 410)])
        await until(lambda: len(got) == 410, "every record")
        assert len(segment_files(log_dir)) > 20
    await follower  # the log closed: the iteration ended by itself
    assert [r.lsn for r in got] == list(range(1, 411)) and lsns == range(401, 411)
    data = {r.data for r in got}
    assert data == {payload(i) for i in range(410)}  # byte-exact (concurrent order varies)
    assert [r.data for r in got[:200]] == [payload(i) for i in range(200)]


async def test_several_followers_each_see_everything(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        got: list[list[Record]] = [[] for _ in range(8)]
        followers = [asyncio.ensure_future(collect(wal.read(follow=True), g)) for g in got]
        late: list[Record] = []

        async def appender(k: int) -> None:
            for i in range(50):
                await wal.append(b"%d-%d" % (k, i) * 20)

        await asyncio.gather(*(appender(k) for k in range(16)))
        followers.append(asyncio.ensure_future(collect(wal.read(start=700, follow=True), late)))
        await wal.append(b"last")
        expected = [r async for r in wal.read()]
        assert len(expected) == 801
        await until(lambda: all(len(g) == 801 for g in got), "every follower to catch up")
        await until(lambda: waiting(wal) == 9, "every follower to wait")
    await asyncio.gather(*followers)
    assert all(g == expected for g in got)
    assert late == expected[699:]
    assert waiting(wal) == 0


async def test_end_stops_a_follower(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"1")
        got: list[Record] = []
        # Starts and ends in the future: waits for LSN 3, stops after LSN 5 by itself.
        follower = asyncio.ensure_future(collect(wal.read(3, 5, follow=True), got))
        for i in range(2, 11):
            await wal.append(b"%d" % i)
        await asyncio.wait_for(follower, 30)
        assert got == [Record(i, b"%d" % i) for i in (3, 4, 5)]
        assert [r async for r in wal.read(7, 6, follow=True)] == []  # an empty range
        assert [r.lsn async for r in wal.read(9, 10, follow=True)] == [9, 10]  # all there
        assert waiting(wal) == 0


async def test_a_follower_at_the_end_of_an_idle_log_gets_the_next_append(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        for i in range(3):
            await wal.append(b"old %d" % i)
        it = wal.read(start=wal.last_lsn + 1, follow=True)
        nxt = asyncio.ensure_future(it.__anext__())
        await until(lambda: waiting(wal) == 1, "the follower to wait")
        assert not nxt.done()
        assert await wal.append(b"new") == 4
        assert await nxt == Record(4, b"new")
        await it.aclose()


async def test_a_follower_never_passes_synced_lsn_in_interval_mode(log_dir: Path) -> None:
    async with walasync.open(log_dir, durability="interval", sync_interval=3600) as wal:
        got: list[Record] = []
        late: list[Record] = []

        async def follow(into: list[Record]) -> None:
            async for rec in wal.read(follow=True):
                assert rec.lsn <= wal.synced_lsn  # durable when yielded
                into.append(rec)

        follower = asyncio.ensure_future(follow(got))
        for i in range(10):
            await wal.append(b"a%d" % i)
        assert wal.last_lsn == 10 and wal.synced_lsn == 0
        # Started with records acknowledged but not synced: it must not read them either.
        late_follower = asyncio.ensure_future(follow(late))
        await until(lambda: waiting(wal) == 2, "the followers to wait")
        assert got == [] and late == []  # acknowledged, not synced: not yielded
        await wal.sync()
        await until(lambda: len(got) == len(late) == 10, "the synced records")
        for i in range(5):
            await wal.append(b"b%d" % i)
        await until(lambda: waiting(wal) == 2, "the followers to wait again")
        assert len(got) == len(late) == 10
        await wal.sync()
        await until(lambda: len(got) == 15, "the synced records")
        await wal.append(b"at close")  # close fdatasyncs in INTERVAL mode: it is durable
    await asyncio.gather(follower, late_follower)
    assert [r.lsn for r in got] == [r.lsn for r in late] == list(range(1, 17))


async def test_a_follower_in_none_mode_ends_at_synced_lsn(log_dir: Path) -> None:
    async with walasync.open(log_dir, durability="none") as wal:
        got: list[Record] = []
        follower = asyncio.ensure_future(collect(wal.read(follow=True), got))
        for i in range(3):
            await wal.append(b"%d" % i)
        await wal.sync()
        await wal.append(b"never synced")
    await follower  # close does not fdatasync in NONE mode: the last one is not durable
    assert [r.lsn for r in got] == [1, 2, 3]


async def test_close_ends_a_waiting_follower(log_dir: Path) -> None:
    wal = await walasync.open(log_dir)
    await wal.append(b"x")
    got: list[Record] = []
    follower = asyncio.ensure_future(collect(wal.read(follow=True), got))
    await until(lambda: waiting(wal) == 1, "the follower to wait")
    await wal.close()  # does not wait for the follower
    await asyncio.wait_for(follower, 30)
    assert got == [Record(1, b"x")] and waiting(wal) == 0


async def test_close_lets_a_follower_finish_what_is_durable(log_dir: Path) -> None:
    wal = await walasync.open(log_dir, **small())
    for i in range(100):
        await wal.append(payload(i))
    resume = asyncio.Event()
    got: list[Record] = []

    async def slow_follower() -> None:
        async for rec in wal.read(follow=True):
            got.append(rec)
            if len(got) == 1:
                await resume.wait()  # stopped mid-iteration, a segment open

    follower = asyncio.ensure_future(slow_follower())
    await until(lambda: len(got) == 1, "the first record")
    queued = [asyncio.ensure_future(wal.append(payload(i))) for i in range(100, 150)]
    await asyncio.sleep(0)  # they run up to their await: queued before close() begins
    await wal.close()  # the queued appends become durable during close
    assert [await q for q in queued] == list(range(101, 151))
    resume.set()
    await asyncio.wait_for(follower, 30)
    assert [r.data for r in got] == [payload(i) for i in range(150)]
    with pytest.raises(walasync.ClosedError):
        wal.read(follow=True)


async def test_a_broken_log_stops_a_follower_with_broken_log_error(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        await wal.append(b"durable")
        got: list[Record] = []
        follower = asyncio.ensure_future(collect(wal.read(follow=True), got))
        await until(lambda: waiting(wal) == 1, "the follower to wait")
        io.fail_fdatasync = errno.EIO
        with pytest.raises(BrokenLogError):
            await wal.append(b"lost")
        with pytest.raises(BrokenLogError):
            await follower
        assert got == [Record(1, b"durable")]  # every durable record first
        with pytest.raises(BrokenLogError):  # a follower started now yields, then raises
            async for rec in wal.read(follow=True):
                assert rec == Record(1, b"durable")
        assert waiting(wal) == 0


# -- leaking nothing ------------------------------------------------------------------------


async def test_break_leaks_no_file_and_no_waiter(log_dir: Path) -> None:
    io = ReaderFiles()
    async with walasync.open(log_dir, io=io, **small()) as wal:
        for i in range(100):
            await wal.append(payload(i))
        # Closed explicitly: deterministic.
        async with contextlib.aclosing(wal.read(follow=True)) as it:
            async for rec in it:
                if rec.lsn == 50:
                    assert io.open_fds  # stopped inside a segment
                    break
        assert not io.open_fds and waiting(wal) == 0
        # A bare `break`: the generator is closed when collected, a moment later.
        async for rec in wal.read(follow=True):
            if rec.lsn == 50:
                break
        gc.collect()
        await until(lambda: not io.open_fds, "the reader's file to be closed")
        # Broken off while waiting.
        it = wal.read(start=101, follow=True)
        nxt = asyncio.ensure_future(it.__anext__())
        await until(lambda: waiting(wal) == 1, "the follower to wait")
        nxt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await nxt
        assert waiting(wal) == 0 and not io.open_fds
        await it.aclose()
        assert await wal.append(b"after") == 101


async def test_cancelling_a_waiting_follower_leaves_no_waiter(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"x")
        got: list[Record] = []
        followers = [asyncio.ensure_future(collect(wal.read(follow=True), got)) for _ in range(3)]
        await until(lambda: waiting(wal) == 3, "the followers to wait")
        followers[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await followers[0]
        assert waiting(wal) == 2  # the others still wait, undisturbed
        await wal.append(b"y")
        await until(lambda: len(got) == 5, "the others to see the append")
        for f in followers[1:]:
            f.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        assert waiting(wal) == 0
        assert wal._batcher.watch() is not None  # the log is fine: a new watch registers
        wal._batcher._watchers.clear()


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "plain"])
@pytest.mark.parametrize("at", ["open", "read"])
async def test_cancelling_a_reader_inside_a_file_read_closes_its_file(
    log_dir: Path, at: str, follow: bool
) -> None:
    """Cancelled while the executor opens or reads its file, a reader (following or not)
    waits for that call to end, then closes the file: none leaks, none is closed under a
    read."""
    io = ReaderFiles()
    async with walasync.open(log_dir, io=io) as wal:
        for _ in range(3):  # over one read chunk (1 MiB) in one segment
            await wal.append_many([b"r" * 50_000] * 10)
        got: list[Record] = []
        first = asyncio.Event()
        go_on = asyncio.Event()

        async def follower_task() -> None:
            async for rec in wal.read(follow=True):
                got.append(rec)
                first.set()
                await go_on.wait()

        io.held.clear()
        if at == "open":
            io.reads.clear()  # the follower's first open waits at the gate
            go_on.set()
        follower = asyncio.ensure_future(follower_task())
        if at == "read":
            await first.wait()
            io.reads.clear()  # its next pread, in the same file, waits at the gate
            go_on.set()
        await until(io.held.is_set, "a reader call at the gate")
        assert bool(io.open_fds) == (at == "read")
        follower.cancel()
        await asyncio.sleep(0.01)  # a chance to (wrongly) finish with the call still held
        assert not follower.done()  # it waits for the call, whose file it must close
        io.reads.set()
        with pytest.raises(asyncio.CancelledError):
            await follower
        assert not io.open_fds and waiting(wal) == 0
        assert len(got) < 30 and await wal.append(b"after") == 31


async def test_a_follower_from_another_loop_is_a_wrong_loop_error(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"a")

        async def foreign() -> None:
            async for _ in wal.read(follow=True):
                pass

        with pytest.raises(WrongLoopError):
            await asyncio.to_thread(asyncio.run, foreign())
        assert waiting(wal) == 0
        assert [r async for r in wal.read(follow=True, end=1)] == [Record(1, b"a")]


# -- the latest batches, from the writer's memory ---------------------------------------------


async def test_a_follower_at_the_tail_reads_from_memory_and_matches_the_file(
    log_dir: Path,
) -> None:
    """Batches written while a follower runs come from the writer's memory (no file read);
    they are the records the file holds, units and all."""
    async with walasync.open(log_dir) as wal:
        batches = wal.read_batches(1, follow=True)
        first = asyncio.ensure_future(anext(batches))
        await until(lambda: waiting(wal) == 1, "the follower to wait")
        held = wal._batcher._recent
        await wal.append(b"a")
        await wal.append_many([b"b", b"c", b"d"])
        await wal.append(b"e")
        assert [b.lsn for b in held] == [1, 2, 5]  # kept while the follower runs
        got = [await first]
        while sum(len(b.records) for b in got) < 5:
            got.append(await anext(batches))
        await batches.aclose()
        assert not held  # let go with the last follower
        from_file = [b async for b in wal.read_batches(1, 5)]
        assert got == from_file
        assert [r for b in got for r in b.records] == [b"a", b"b", b"c", b"d", b"e"]
        assert got[1].joined == (0, 1)


@pytest.mark.parametrize("cut", [2, 1])
async def test_a_cut_under_batches_held_in_memory(log_dir: Path, cut: int) -> None:
    """A follower holding one batch of several taken from memory at once: a truncate_back
    below the next ones ends their handing out. Cut right after what it gave: the follower
    goes on with the records appended after the cut (never the removed ones); cut below
    what it gave: TruncatedError."""
    async with walasync.open(log_dir) as wal:
        batches = wal.read_batches(1, follow=True)
        first = asyncio.ensure_future(anext(batches))
        await until(lambda: waiting(wal) == 1, "the follower to wait")
        await wal.append(b"1")
        assert (await first).records == [b"1"]
        await wal.append(b"2")
        await wal.append(b"3")  # two batches, kept: the follower takes both in one pass
        assert (await anext(batches)).records == [b"2"]
        await wal.truncate_back(cut)  # removes 3 (and 2, with cut=1)
        if cut == 1:
            with pytest.raises(walasync.TruncatedError):
                await anext(batches)
            return
        nxt = asyncio.ensure_future(anext(batches))
        await wal.append(b"after the cut")
        assert await nxt == walasync.Batch(3, [b"after the cut"], ())
        await batches.aclose()


async def test_the_batches_kept_for_followers_stay_within_8_mib(log_dir: Path) -> None:
    """Memory stays bounded: past 8 MiB of records the oldest kept batches go (a follower
    further behind reads the file), and a batch larger than that alone is kept alone."""
    async with walasync.open(log_dir, max_record_size=9 << 20) as wal:
        batches = wal.read_batches(1, follow=True)
        first = asyncio.ensure_future(anext(batches))
        await until(lambda: waiting(wal) == 1, "the follower to wait")
        held = wal._batcher._recent
        for i in range(12):
            await wal.append(bytes([i]) * (1 << 20))  # one batch each
        assert sum(len(r) for b in held for r in b.records) <= 8 << 20
        assert [b.lsn for b in held] == list(range(5, 13))  # the newest, no gap
        await wal.append(bytes(9 << 20))
        assert [b.lsn for b in held] == [13]
        got = [await first]
        while got[-1].lsn < 13:
            got.append(await anext(batches))  # 1..4 from the file, the rest from memory
        assert [r[:1] for b in got for r in b.records] == [bytes([i]) for i in range(12)] + [b"\0"]
        await batches.aclose()
