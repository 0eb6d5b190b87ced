"""Reads, followers and truncate_front racing a `truncate_back`: bugs the kill -9 torture
with `truncate_back` (tests/test_crash.py) and the follow rules of the model
(tests/test_model.py) ran into, each pinned down with the I/O thread held at one step of
the cut. All are fixed; each stays as a plain test.

The cut's steps (`Appender.truncate_back`, `Store.cut`): fdatasync; commit META with the
cut; append the cut to `store.cuts`, set `store.cutting` (`store.meta` names the cut from
here on); delete later segments; rewrite the batch that holds the cut in place, zero the
rest, fdatasync; write META again with the cut cleared (`store.meta` is that META from its
start). Back on the loop, the batcher sets `cuts_done` and clears `cutting`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from conftest import segment_files, small, until
from iofaults import ControlledIO

import walasync
from walasync import BrokenLogError, CorruptionError, FileIO, Record, TruncatedError
from walasync._meta import TMP_NAME
from walasync.testing import SimulatedDisk


class HoldMetaWrite(FileIO):
    """Once armed, holds the I/O thread as it starts the `nth` META write: the second of a
    truncate_back is the one that clears the cut, after the segment was cut and zeroed."""

    def __init__(self, nth: int = 2) -> None:
        self.nth = nth
        self.armed = False
        self.writes = 0
        self.held = threading.Event()
        self.release = threading.Event()

    def open(self, path: str, *, create: bool = False) -> int:
        if self.armed and os.path.basename(path) == TMP_NAME:
            self.writes += 1
            if self.writes == self.nth:
                self.held.set()
                assert self.release.wait(30), "test gate never opened"
        return super().open(path, create=create)


async def waiting(wal: walasync.Wal, reading: AsyncIterator[Record]) -> asyncio.Future[Record]:
    """Ask a follower for its next record; return the request once the follower waits."""
    following = asyncio.ensure_future(anext(reading))
    await until(lambda: following.done() or len(wal._batcher._watchers) == 1, "a wait")
    assert not following.done(), following.result()
    return following


async def five_records(wal: walasync.Wal) -> None:
    """LSN 1 alone, then 2..5 appended together: one batch of four one-record units."""
    await wal.append(b"1")
    lsns = await asyncio.gather(*(wal.append(b"%d" % i) for i in range(2, 6)))
    assert lsns == [2, 3, 4, 5]


@contextlib.asynccontextmanager
async def cut_held(wal: walasync.Wal, io: HoldMetaWrite, lsn: int):  # type: ignore[no-untyped-def]
    """Run `truncate_back(lsn)` until the I/O thread is held in it; let it finish on exit."""
    io.armed = True
    cut = asyncio.ensure_future(wal.truncate_back(lsn))
    try:
        await until(io.held.is_set, "the cut to reach the held META write")
        yield cut
    finally:
        io.release.set()
        await cut


async def test_truncate_front_refuses_an_lsn_a_truncate_back_made_invalid(
    log_dir: Path,
) -> None:
    """Fixed: truncate_front checked `lsn <= last_lsn + 1` before it waited for a
    truncate_back holding the lifecycle lock; the cut lowered last_lsn, and first_lsn
    became 9 with last_lsn 2: the next append got LSN 3, acknowledged and unreadable, and
    the reopened log had first_lsn above last_lsn + 1."""
    async with walasync.open(log_dir) as wal:
        for i in range(1, 11):
            await wal.append(b"%d" % i)
        cut = asyncio.ensure_future(wal.truncate_back(2))
        await until(wal._lifecycle.locked, "truncate_back to hold the lifecycle lock")
        front = asyncio.ensure_future(wal.truncate_front(9))  # valid when called
        await cut
        with pytest.raises(ValueError):
            await front
        assert (wal.first_lsn, wal.last_lsn) == (1, 2)
        assert await wal.append(b"x") == 3
        assert [r.lsn async for r in wal.read()] == [1, 2, 3]
    async with walasync.open(log_dir) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (1, 3)


async def test_a_read_holding_a_batch_yields_nothing_a_returned_cut_removed(
    log_dir: Path,
) -> None:
    io = HoldMetaWrite()
    async with walasync.open(log_dir, io=io) as wal:
        await five_records(wal)
        reading = wal.read(2)
        assert await reading.__anext__() == Record(2, b"2")  # holds the batch 2..5
        async with cut_held(wal, io, 2):
            # Concurrent with the cut (committed, not returned): giving LSN 3 would be
            # allowed, and refusing it is too.
            try:
                assert await reading.__anext__() == Record(3, b"3")
            except TruncatedError:
                return
        with pytest.raises(TruncatedError):
            rec = await reading.__anext__()
            pytest.fail(f"truncate_back(2) returned, then the read gave {rec}")


@pytest.mark.parametrize("follow", [False, True])
async def test_a_read_crossing_into_a_segment_a_cut_emptied_raises_truncated_error(
    log_dir: Path, follow: bool
) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        assert await wal.append_many([bytes(1000)] * 3) == range(1, 4)  # one batch
        assert await wal.append(bytes(2000)) == 4  # no room left: the second segment
        assert wal._store.snapshot() == (1, 4)
        reading = wal.read(1, follow=follow)
        assert (await reading.__anext__()).lsn == 1  # it holds the batch 1..3
        await wal.truncate_back(3)  # the second segment stays, empty
        assert [(await reading.__anext__()).lsn for _ in range(2)] == [2, 3]
        if not follow:
            with pytest.raises(TruncatedError):
                await reading.__anext__()
            return
        # The follower gave nothing that was removed: it waits for LSN 4, then gives it.
        following = await waiting(wal, reading)
        await wal.append(b"new")
        assert await following == Record(4, b"new")


@pytest.mark.parametrize("follow", [False, True])
@pytest.mark.parametrize("keep", [3, 2])  # 3: the second segment stays, empty; 2: it goes
async def test_a_read_that_gave_a_whole_segment_then_crosses_a_cut(
    log_dir: Path, follow: bool, keep: int
) -> None:
    """As above, but the read has given the last record of the segment (it holds no more
    of it) when the cut empties or deletes the next one; the model's slow followers found
    the deleted case (WalError, ENOENT, before the fix on main)."""
    async with walasync.open(log_dir, **small()) as wal:
        units = [wal.append(bytes(1000)) for _ in range(3)]  # one batch, three units
        assert await asyncio.gather(*units) == [1, 2, 3]
        assert await wal.append(bytes(2000)) == 4  # no room left: the second segment
        assert wal._store.snapshot() == (1, 4)
        reading = wal.read(1, follow=follow)
        assert [(await reading.__anext__()).lsn for _ in range(3)] == [1, 2, 3]
        await wal.truncate_back(keep)
        if not follow or keep < 3:  # a plain read reaches 4; this follower gave 3
            with pytest.raises(TruncatedError):
                await reading.__anext__()
            return
        following = await waiting(wal, reading)
        await wal.append(b"new")
        assert await following == Record(4, b"new")


async def test_a_read_reaching_a_cut_in_progress_raises_truncated_error(
    log_dir: Path,
) -> None:
    io = HoldMetaWrite()
    async with walasync.open(log_dir, io=io) as wal:
        await five_records(wal)
        reading = wal.read(1)
        got = []
        async with cut_held(wal, io, 1):  # records 2..5 are zeroed
            with pytest.raises(TruncatedError):
                async for rec in reading:
                    got.append(rec)  # noqa: PERF401 - what it gave before it stopped
        assert got == [Record(1, b"1")]


async def test_a_read_starting_between_a_cuts_two_commit_steps_raises_truncated_error(
    log_dir: Path,
) -> None:
    """The I/O thread commits a cut in two steps (`cuts`, then `cutting`). A read starting
    between them (here: `cutting` put back to 0 while it starts) took the cut for one made
    before it; reaching the zeroed records once the cut was over, it reported them as
    corruption (the kill -9 torture, in CI)."""
    io = HoldMetaWrite()
    async with walasync.open(log_dir, io=io) as wal:
        await five_records(wal)
        async with cut_held(wal, io, 1):  # committed; records 2..5 are zeroed
            store = wal._store
            cutting, store.cutting = store.cutting, 0
            reading = wal.read(1)  # up to 5: the writer's watermarks do not show the cut yet
            store.cutting = cutting
        assert wal.last_lsn == 1 and not store.cutting  # the cut is over
        got = []
        with pytest.raises(TruncatedError):
            async for rec in reading:
                got.append(rec)  # noqa: PERF401 - what it gave before it stopped
        assert got == [Record(1, b"1")]


async def test_a_follower_starting_between_a_cuts_two_commit_steps_gives_nothing_removed(
    log_dir: Path,
) -> None:
    """As above, for a follower: starting between the two steps, it saw no cut under way
    and went on towards the watermark, into the records the cut removes."""
    io = HoldMetaWrite()
    async with walasync.open(log_dir, io=io) as wal:
        await five_records(wal)
        reading = wal.read(1, follow=True)
        async with cut_held(wal, io, 1):  # committed; records 2..5 are zeroed
            store = wal._store
            cutting, store.cutting = store.cutting, 0
            first = asyncio.ensure_future(reading.__anext__())
            await asyncio.sleep(0)  # its first pass starts: what it may read is set
            store.cutting = cutting
        assert await first == Record(1, b"1")
        following = await waiting(wal, reading)
        assert await wal.append(b"new") == 2
        assert await following == Record(2, b"new")
        await reading.aclose()


async def test_a_follower_reaching_a_cut_in_progress_waits_for_what_follows_it(
    log_dir: Path,
) -> None:
    """The cut removes nothing the follower gave: it gives no removed record, waits while
    the cut runs, and goes on with the records appended after it."""
    io = HoldMetaWrite()
    async with walasync.open(log_dir, io=io) as wal:
        await five_records(wal)
        reading = wal.read(1, follow=True)
        assert await reading.__anext__() == Record(1, b"1")
        async with cut_held(wal, io, 1):  # records 2..5 are zeroed
            following = await waiting(wal, reading)
        assert await wal.append(b"new") == 2
        assert await following == Record(2, b"new")
        await reading.aclose()


async def test_a_read_reaching_a_segment_a_cut_deletes_raises_truncated_error(
    log_dir: Path,
) -> None:
    io = HoldMetaWrite()
    async with walasync.open(log_dir, io=io, **small()) as wal:
        for i in range(1, 61):
            await wal.append(b"record %d|" % i + bytes(150))
        later = wal._store.snapshot()[-1]
        assert later > 20
        reading = wal.read(later)  # its snapshot holds the segments the cut deletes
        async with cut_held(wal, io, 10):
            with pytest.raises(TruncatedError):
                rec = await reading.__anext__()
                pytest.fail(f"the read gave {rec}")


@pytest.mark.parametrize("durability", ["interval", "none"])
async def test_a_cut_that_removes_nothing_makes_nothing_durable(
    log_dir: Path, durability: str
) -> None:
    """Fixed (found by the model's followers): truncate_back(last_lsn) removes nothing
    and syncs nothing, but set synced_lsn to last_lsn: `sync()` then returned without an
    fdatasync, and a follower would have given records a power loss can take."""
    io = ControlledIO()
    async with walasync.open(log_dir, io=io, durability=durability, sync_interval=3600) as wal:
        await wal.append(b"a")
        await wal.append(b"b")
        assert wal.synced_lsn == 0
        await wal.truncate_back(wal.last_lsn)
        assert wal.synced_lsn == 0
        before = io.fdatasyncs
        await wal.sync()
        assert io.fdatasyncs > before
        assert wal.synced_lsn == 2


async def test_a_cut_wakes_followers(log_dir: Path) -> None:
    """Fixed (found by the model's followers): in the relaxed modes truncate_back makes
    what it keeps durable, but followers slept on until the next sync or append; and a
    follower whose records a cut removed learnt of it only then."""
    async with walasync.open(log_dir, durability="interval", sync_interval=3600) as wal:
        got: list[Record] = []

        async def follow(start: int) -> None:
            async for rec in wal.read(start, follow=True):
                got.append(rec)  # noqa: PERF401 - the test watches it grow

        waiting = wal._batcher._watchers
        behind = asyncio.ensure_future(follow(1))
        for data in (b"a", b"b", b"c"):
            await wal.append(data)
        await until(lambda: len(waiting) == 1, "the follower to wait")
        assert got == []  # nothing is durable yet
        await wal.truncate_back(2)  # 1 and 2 are durable now
        await until(lambda: len(got) == 2, "the follower to give the durable records", 10)
        assert got == [Record(1, b"a"), Record(2, b"b")]
        await until(lambda: len(waiting) == 1, "the follower to wait")
        await wal.truncate_back(1)  # removes 2, which it gave
        with pytest.raises(TruncatedError):
            await behind


@pytest.mark.parametrize("durability", ["interval", "none"])
async def test_a_sync_racing_a_cut_claims_nothing_the_cut_left_unsynced(
    durability: str,
) -> None:
    """Fixed (found by KeyedLog's crash tests): sync() noted last_lsn (60), its fdatasync
    ran while truncate_back(39) cut, and 40..44 appended after the cut were written but not
    synced; sync() then set synced_lsn to 60, above last_lsn, and a power loss took
    records that synced_lsn reported durable."""
    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    async with walasync.open(
        "/data/log", io=disk, durability=durability, sync_interval=3600
    ) as wal:
        for i in range(1, 61):
            await wal.append(b"%d" % i)
        # The cut's job is queued first; the sync notes last_lsn (60) and queues behind it.
        await asyncio.gather(wal.truncate_back(39), wal.sync())
        assert wal.synced_lsn <= wal.last_lsn == 39
        for i in range(40, 45):
            await wal.append(b"new %d" % i)
        assert wal.synced_lsn <= 39
        durable = wal.synced_lsn
        after = disk.crash()
    async with walasync.open("/data/log", io=after) as wal:
        assert wal.last_lsn >= durable
        assert [r.lsn async for r in wal.read(1, durable)] == list(range(1, durable + 1))


class HoldRead(FileIO):
    """Once armed, holds the first `pread` of more than `over` bytes and less than 1 MiB (a
    read of a batch too big for a read's first chunk, after its header was read; not the
    1 MiB chunk a read-only look at the writer's tail takes) until released."""

    def __init__(self, over: int) -> None:
        self.over = over
        self.armed = False
        self.held = threading.Event()
        self.release = threading.Event()

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if self.armed and self.over < size < 1 << 20:
            self.armed = False
            self.held.set()
            assert self.release.wait(30), "test gate never opened"
        return super().pread(fd, size, offset)


@pytest.mark.parametrize("follow", [False, True])
async def test_a_read_of_the_batch_a_cut_rewrites_gives_the_records_it_keeps(
    log_dir: Path, follow: bool
) -> None:
    """Fixed (the kill -9 torture with truncate_back, in CI): a cut inside a batch rewrites
    it in place with the records it keeps. A read that took the batch's header before the
    rewrite and its body after it found an invalid batch and raised `CorruptionError`
    ("expected LSN 2, found an invalid batch") on a sound log. It now reads the batch again
    once the cut is over: the records below the cut, then `TruncatedError` (the read
    began before the cut)."""
    io = HoldRead(64 << 10)
    async with walasync.open(log_dir, io=io) as wal:
        await wal.append(b"first")
        lsns = await asyncio.gather(*(wal.append(b"%d|" % i + bytes(999)) for i in range(100)))
        assert lsns == list(range(2, 102))
        batches = [(b.lsn, len(b.records)) async for b in wal.read_batches()]
        assert batches == [(1, 1), (2, 100)]  # 100 kB: more than a read's first chunk
        reading = wal.read(2, follow=follow)
        io.armed = True
        first = asyncio.ensure_future(reading.__anext__())
        await until(io.held.is_set, "the read to hold the batch's header")
        await wal.truncate_back(50)  # rewrites the batch with 2..50, zeroes the rest
        io.release.set()
        got = [await first]
        if follow:
            got += [await reading.__anext__() for _ in range(48)]
            following = await waiting(wal, reading)
            assert await wal.append(b"new") == 51
            assert await following == Record(51, b"new")
            await reading.aclose()
        else:
            with pytest.raises(TruncatedError):
                async for rec in reading:
                    got.append(rec)
        assert [r.lsn for r in got[:49]] == list(range(2, 51))
        assert all(r.data.startswith(b"%d|" % (r.lsn - 2)) for r in got[:49])


async def test_a_read_only_read_of_the_batch_a_cut_rewrites_gives_the_records_it_keeps(
    log_dir: Path,
) -> None:
    """As above, for a read-only reader: it learns of the cut from META."""
    io = HoldRead(64 << 10)
    async with walasync.open(log_dir) as wal:
        await wal.append(b"first")
        await asyncio.gather(*(wal.append(b"%d|" % i + bytes(999)) for i in range(100)))
        async with walasync.open(log_dir, readonly=True, io=io) as ro:
            assert ro.last_lsn == 101
            reading = ro.read(2)
            io.armed = True
            first = asyncio.ensure_future(reading.__anext__())
            await until(io.held.is_set, "the read to hold the batch's header")
            await wal.truncate_back(50)
            io.release.set()
            got = [await first]
            with pytest.raises(TruncatedError):
                async for rec in reading:
                    got.append(rec)  # noqa: PERF401 - what it gave before it stopped
            assert [r.lsn for r in got] == list(range(2, 51))


class HoldReadFailCut(HoldRead):
    """As `HoldRead`; once `fail_cut` is set, the fdatasync after the cut rewrote its batch
    (one buffer written at `offset`) fails with EIO; the zeroing thread's do not."""

    def __init__(self, over: int, offset: int) -> None:
        super().__init__(over)
        self.offset = offset
        self.fail_cut = False
        self.rewrote = False

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        super().pwritev(fd, buffers, offset)
        self.rewrote |= self.fail_cut and len(buffers) == 1 and offset == self.offset

    def fdatasync(self, fd: int) -> None:
        if self.rewrote and not threading.current_thread().name.startswith("walasync-prealloc"):
            self.rewrote = self.fail_cut = False
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fdatasync(fd)


async def test_a_read_of_the_batch_a_failed_cut_rewrote_raises_without_waiting(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that finds the batch a cut was rewriting waits for the cut to end; when the
    cut fails (the log is broken, META still shows the cut) it raises at once."""
    monkeypatch.setattr("walasync._reader.CUT_WAIT", 3600.0)  # a wait would hang the test
    io = HoldReadFailCut(64 << 10, 72)  # the second batch's offset
    async with walasync.open(log_dir, io=io) as wal:
        await wal.append(b"first")
        await asyncio.gather(*(wal.append(b"%d|" % i + bytes(999)) for i in range(100)))
        reading = wal.read(2)
        io.armed = io.fail_cut = True
        first = asyncio.ensure_future(reading.__anext__())
        await until(io.held.is_set, "the read to hold the batch's header")
        with pytest.raises(BrokenLogError):
            await wal.truncate_back(50)
        io.release.set()
        with pytest.raises(CorruptionError, match="offset 72: expected LSN 2"):
            await asyncio.wait_for(first, 60)


def replace_once(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


async def test_damage_below_a_cut_made_during_a_read_still_raises(log_dir: Path) -> None:
    """A read that finds an invalid batch after a cut above it reads it again once, and
    no more: damage that is not the cut's rewrite raises `CorruptionError`."""
    async with walasync.open(log_dir, **small()) as wal:
        await wal.append(b"first")
        lsns = await asyncio.gather(*(wal.append(b"%03d|" % i + bytes(95)) for i in range(2, 22)))
        assert lsns == list(range(2, 22))  # one batch
        assert await wal.append(bytes(2000)) == 22  # no room left: the second segment
        await asyncio.gather(*(wal.append(b"%d" % i) for i in range(23, 43)))
        first, _ = segment_files(log_dir)
        assert [b.lsn async for b in wal.read_batches(end=21)] == [1, 2]
        replace_once(first, b"010|", b"110|")  # a bit of record 10 flips
        reading = wal.read(2)  # it began before the cut
        await wal.truncate_back(30)  # rewrites a batch of the second segment
        with pytest.raises(CorruptionError, match="offset 72: expected LSN 2"):
            await asyncio.wait_for(reading.__anext__(), 60)


async def test_a_read_only_read_waits_a_bounded_time_for_a_cut_that_never_ends(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only reader cannot see a cut fail (or its writer killed during it): META
    shows the cut under way for good. It waits `CUT_WAIT` for the cut to end, then raises
    what it found."""
    monkeypatch.setattr("walasync._reader.CUT_WAIT", 0.2)
    writer_io = HoldReadFailCut(1 << 20, 72)  # holds no read; fails the cut's fdatasync
    io = HoldRead(64 << 10)
    async with walasync.open(log_dir, io=writer_io) as wal:
        await wal.append(b"first")
        await asyncio.gather(*(wal.append(b"%d|" % i + bytes(999)) for i in range(100)))
        async with walasync.open(log_dir, readonly=True, io=io) as ro:
            reading = ro.read(2)
            io.armed = writer_io.fail_cut = True
            first = asyncio.ensure_future(anext(reading))
            await until(io.held.is_set, "the read to hold the batch's header")
            with pytest.raises(BrokenLogError):
                await wal.truncate_back(50)
            io.release.set()
            with pytest.raises(CorruptionError, match="offset 72: expected LSN 2"):
                await asyncio.wait_for(first, 60)
