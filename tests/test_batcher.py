"""Group commit: batching, backpressure, cancellation, failure and durability modes.

`ControlledIO` holds the I/O thread's fdatasync at a gate, so a test can pile appends up
behind a batch in flight and see exactly what the next batch holds.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import cancel_after, small, until
from iofaults import ControlledIO

import walasync
from walasync import BrokenLogError, Durability


async def wait_until_in_fdatasync(io: ControlledIO) -> None:
    """Wait (off the loop: it is a threading.Event) until the I/O thread is held."""
    assert await asyncio.to_thread(io.entered_fdatasync.wait, 10)


async def hold(io: ControlledIO, wal: walasync.Wal) -> asyncio.Future[int]:
    """Close the gate and put one append in flight, stuck in its fdatasync."""
    io.gate.clear()
    io.entered_fdatasync.clear()
    first = asyncio.ensure_future(wal.append(b"first"))
    await wait_until_in_fdatasync(io)
    return first


async def test_pending_appends_go_out_in_one_write_and_one_fdatasync(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        first = await hold(io, wal)
        writes, syncs = io.batch_writes, io.fdatasyncs
        rest = [asyncio.ensure_future(wal.append(b"r%d" % i)) for i in range(500)]
        await until(lambda: wal._batcher.in_flight == 501, "the 500 to be sent")
        assert io.batch_writes == writes  # all waiting behind the held batch
        io.gate.set()
        assert await first == 1
        assert sorted(await asyncio.gather(*rest)) == list(range(2, 502))
        assert io.batch_writes == writes + 1  # the 500 went out together...
        assert io.fdatasyncs == syncs + 2  # ...with one fdatasync, after the held one


async def test_max_batch_bytes_splits_batches_without_splitting_units(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io, max_batch_bytes=1000) as wal:
        first = await hold(io, wal)
        writes = io.batch_writes
        tasks = [asyncio.ensure_future(wal.append(b"x" * 96)) for _ in range(30)]  # 100 B each
        unit = asyncio.ensure_future(wal.append_many([b"y" * 96] * 15))
        await asyncio.sleep(0.01)
        io.gate.set()
        await first
        await asyncio.gather(*tasks)
        assert await unit == range(32, 47)
        assert io.batch_writes - writes == 4  # 10 + 10 + 10 singles, then the unit alone


async def test_max_batch_delay_gathers_sequential_callers(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io, max_batch_delay=0.05) as wal:
        writes = io.batch_writes

        async def staggered(i: int) -> int:
            await asyncio.sleep(i * 0.002)
            return await wal.append(b"%d" % i)

        await asyncio.gather(*(staggered(i) for i in range(10)))
        assert io.batch_writes - writes <= 2


async def test_backpressure_bounds_queued_bytes(log_dir: Path) -> None:
    io = ControlledIO()
    limit = 20_000
    async with walasync.open(log_dir, io=io, max_pending_bytes=limit) as wal:
        first = await hold(io, wal)
        batcher = wal._batcher
        tasks = [asyncio.ensure_future(wal.append(b"%06d" % i * 100)) for i in range(5000)]

        def settled() -> bool:
            # Every appender has called append (its record is in flight, queued, or waiting
            # for room), and every appender let in has queued its record: nothing moves
            # until the held batch completes. (A fixed sleep here could end, on a loaded
            # machine, before the appenders let in had run.)
            seen = batcher.in_flight + batcher.pending + len(batcher._space_waiters)
            return seen == 5001 and batcher._reserved == 0

        await until(settled, "every appender to queue or wait")
        assert batcher._pending_bytes + batcher._reserved <= limit
        assert batcher._pending_bytes > limit // 2  # the queue did fill up
        waiting = len(batcher._space_waiters)
        assert waiting > 4000  # the rest wait, holding nothing in the log's memory
        peak = 0

        async def watch() -> None:
            # Sample now and then: a loop spinning on sleep(0) would starve the I/O thread
            # of the GIL (each hand-off waits out the 5 ms switch interval).
            nonlocal peak
            while not all(t.done() for t in tasks):
                peak = max(peak, batcher._pending_bytes + batcher._reserved)
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        io.gate.set()
        await first
        lsns = await asyncio.gather(*tasks)
        await watcher
        assert peak <= limit
        # Waiters were served first come, first served: LSNs follow call order.
        assert lsns == sorted(lsns) and lsns == list(range(2, 5002))


async def test_a_record_larger_than_the_queue_limit_still_goes_through(log_dir: Path) -> None:
    async with walasync.open(log_dir, max_pending_bytes=1000) as wal:
        lsns = await asyncio.gather(*(wal.append(b"z" * 5000) for _ in range(5)))
        assert sorted(lsns) == [1, 2, 3, 4, 5]


async def test_cancelled_appenders_do_not_disturb_others(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io, max_pending_bytes=5_000, **small()) as wal:
        first = await hold(io, wal)
        tasks = [asyncio.ensure_future(wal.append(b"%05d" % i * 20)) for i in range(400)]
        await asyncio.sleep(0.01)  # some queued, most waiting for space
        cancelled = set(range(0, 400, 3))
        for i in cancelled:
            tasks[i].cancel()
        io.gate.set()
        await first
        results = await asyncio.gather(*tasks, return_exceptions=True)
        kept = {i: r for i, r in enumerate(results) if i not in cancelled}
        assert all(
            isinstance(r, asyncio.CancelledError) for i, r in enumerate(results) if i in cancelled
        )
        # A cancelled append's record may still be in flight: wait for it.
        await wal.sync()
        # Nothing of the cancelled appends lingers: no record queued or in flight, no bytes
        # counted against backpressure (a leaked reservation would shrink the queue for
        # good), and later appends get the next LSNs right away.
        batcher = wal._batcher
        assert (batcher.pending, batcher.in_flight) == (0, 0), repr(wal)
        assert (batcher._pending_bytes, batcher._reserved) == (0, 0), repr(wal)
        assert not batcher._space_waiters
        assert "pending=0 in_flight=0" in repr(wal)
        before = wal.last_lsn
        later = await asyncio.gather(*(wal.append(b"later%d" % i * 100) for i in range(100)))
        assert sorted(later) == list(range(before + 1, before + 101))
        got = {r.lsn: r.data async for r in wal.read()}
    # Every surviving append is there, byte-exact; LSNs are dense; a cancelled append's
    # record may or may not have been written (it was queued or not), never half.
    assert sorted(got) == list(range(1, before + 101))
    for i, lsn in kept.items():
        assert isinstance(lsn, int)
        assert got[lsn] == b"%05d" % i * 20
    for i, lsn in enumerate(later):
        assert got[lsn] == b"later%d" % i * 100
    extra = set(got.values()) - {b"first"} - {b"%05d" % i * 20 for i in kept}
    extra -= {b"later%d" % i * 100 for i in range(100)}
    assert extra <= {b"%05d" % i * 20 for i in cancelled}


async def test_an_appender_cancelled_after_being_let_in_gives_its_room_back(
    log_dir: Path,
) -> None:
    """Cancelled between being granted room and queuing its record: the room it was
    granted goes back (else the queue would shrink for good) and its record is not written."""
    io = ControlledIO()
    wal = await walasync.open(log_dir, io=io, max_pending_bytes=1000)
    try:
        batcher = wal._batcher
        first = await hold(io, wal)
        a = asyncio.ensure_future(wal.append(b"a" * 600))  # sent behind the held batch
        await until(lambda: batcher.in_flight == 2, "the second batch to be sent")
        b = asyncio.ensure_future(wal.append(b"b" * 600))  # queued: the pipeline is full
        v = asyncio.ensure_future(wal.append(b"v" * 800))  # waits: 604 + 804 > 1000
        w = asyncio.ensure_future(wal.append(b"w" * 100))  # waits behind v (first come...)
        await until(lambda: len(batcher._space_waiters) == 2, "v and w to wait for room")
        v.cancel()  # v leaves the line and lets w in...
        await asyncio.sleep(0)  # ...when its task runs, which is before this one resumes
        assert batcher._reserved == 104 and not w.done()  # w was granted its room
        w.cancel()  # before w's task runs: granted, then cancelled
        io.gate.set()
        results = await asyncio.gather(first, a, b, v, w, return_exceptions=True)
        assert list(results[:3]) == [1, 2, 3]
        assert all(isinstance(r, asyncio.CancelledError) for r in results[3:])
        assert (batcher._pending_bytes, batcher._reserved) == (0, 0), repr(wal)
        assert await asyncio.gather(*(wal.append(b"c" * 300) for _ in range(3))) == [4, 5, 6]
        assert [r.data async for r in wal.read()] == [b"first", b"a" * 600, b"b" * 600] + [
            b"c" * 300
        ] * 3
    finally:
        # close() waits for reserved room to be used: with a leak it would never return.
        await asyncio.wait_for(wal.close(), 30)


async def test_random_cancellation_with_timeouts_keeps_the_log_consistent(
    log_dir: Path,
) -> None:
    async with walasync.open(log_dir, max_pending_bytes=20_000, **small()) as wal:
        acked: dict[int, bytes] = {}
        timeouts = 0

        async def appender(n: int) -> None:
            nonlocal timeouts
            for i in range(40):
                data = b"%d:%d|" % (n, i) * 10
                try:
                    async with cancel_after(0.0005 * ((n * 7 + i) % 5)):
                        acked[await wal.append(data)] = data
                except TimeoutError:
                    timeouts += 1

        await asyncio.gather(*(appender(n) for n in range(50)))
        # A deadline of 0 expires at the next loop pass, before any batch can come back:
        # 8 of each appender's 40 appends are cancelled whatever the machine's speed.
        assert timeouts >= 8 * 50
        await wal.sync()  # records of cancelled appends may still be in flight
        batcher = wal._batcher
        assert (batcher.pending, batcher.in_flight) == (0, 0), repr(wal)
        assert (batcher._pending_bytes, batcher._reserved) == (0, 0), repr(wal)
        after = await wal.append(b"after")
        assert after == wal.last_lsn
        got = {r.lsn: r.data async for r in wal.read()}
    assert sorted(got) == list(range(1, after + 1))
    assert got[after] == b"after"
    assert all(got[lsn] == data for lsn, data in acked.items())


async def test_fdatasync_failure_breaks_the_log_for_good(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        assert await wal.append(b"durable") == 1
        first = await hold(io, wal)
        queued = [asyncio.ensure_future(wal.append(b"q%d" % i)) for i in range(20)]
        await asyncio.sleep(0.01)
        io.fail_fdatasync = errno.EIO
        io.gate.set()
        with pytest.raises(BrokenLogError) as info:
            await first
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.EIO
        for t in queued:  # pending appends fail too: none claims durability
            with pytest.raises(BrokenLogError):
                await t
        syncs = io.fdatasyncs
        with pytest.raises(BrokenLogError):
            await wal.append(b"later")
        with pytest.raises(BrokenLogError):
            await wal.append_many([b"later"])
        with pytest.raises(BrokenLogError):
            await wal.sync()
        assert "broken" in repr(wal)
    assert io.fdatasyncs == syncs  # never retried, not even by close
    async with walasync.open(log_dir) as wal:
        records = [r async for r in wal.read()]
        assert records[0] == walasync.Record(1, b"durable")
        assert await wal.append(b"again") == wal.last_lsn


async def test_a_batch_queued_behind_a_failed_fdatasync_is_never_written(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        first = await hold(io, wal)
        behind = [asyncio.ensure_future(wal.append(b"b%d" % i)) for i in range(5)]
        # The second batch waits at the I/O thread.
        await until(lambda: wal._batcher.in_flight == 6, "the second batch to be sent")
        writes = io.batch_writes
        io.fail_fdatasync = errno.EIO
        io.gate.set()
        results = await asyncio.gather(first, *behind, return_exceptions=True)
        assert all(isinstance(r, BrokenLogError) for r in results)
        assert io.batch_writes == writes  # the batch behind the failure never touched the file
    async with walasync.open(log_dir) as wal:
        assert [r.data async for r in wal.read()] in ([], [b"first"])


async def test_a_batch_queued_behind_a_failed_sync_is_never_written(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io, durability="interval", sync_interval=60) as wal:
        assert await wal.append(b"acked") == 1
        io.gate.clear()
        io.entered_fdatasync.clear()
        syncing = asyncio.ensure_future(wal.sync())
        await wait_until_in_fdatasync(io)
        behind = [asyncio.ensure_future(wal.append(b"b%d" % i)) for i in range(5)]
        await until(lambda: wal._batcher.in_flight == 5, "the batch behind the sync")
        writes = io.batch_writes
        io.fail_fdatasync = errno.EIO
        io.gate.set()
        results = await asyncio.gather(syncing, *behind, return_exceptions=True)
        assert all(isinstance(r, BrokenLogError) for r in results)
        assert io.batch_writes == writes  # nothing is written after a failed fdatasync


async def test_appenders_woken_by_one_batch_go_out_in_overlapping_batches(log_dir: Path) -> None:
    """A large batch's appenders are woken a chunk at a time, and each chunk's next records
    are sent while the loop still runs the rest: the I/O works while the loop does."""
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        first = await hold(io, wal)
        got: list[int] = []

        async def twice(i: int) -> None:
            got.append(await wal.append(b"a%d" % i))
            got.append(await wal.append(b"b%d" % i))

        tasks = [asyncio.ensure_future(twice(i)) for i in range(300)]
        # The first round waits behind the held batch.
        await until(lambda: wal._batcher.in_flight == 301, "the first round to be sent")
        writes = io.batch_writes
        io.gate.set()
        await first
        await asyncio.gather(*tasks)
        assert io.batch_writes - writes >= 3  # the first round, then the second in pieces
        assert sorted(got) == list(range(2, 602))
        assert sorted(got[:300]) == list(range(2, 302))  # acknowledged in LSN order
    async with walasync.open(log_dir) as wal:
        data = [r.data async for r in wal.read()]
    assert sorted(data[1:301]) == sorted(b"a%d" % i for i in range(300))
    assert sorted(data[301:]) == sorted(b"b%d" % i for i in range(300))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
async def test_write_failure_fails_the_batch_with_broken_log(log_dir: Path, code: int) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        await wal.append(b"ok")
        io.fail_write = code
        results = await asyncio.gather(
            *(wal.append(b"%d" % i) for i in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, BrokenLogError) for r in results)
        assert results[0].__cause__.errno == code  # type: ignore[union-attr]
    async with walasync.open(log_dir) as wal:
        records = [r.data async for r in wal.read()]
        assert records[0] == b"ok"


async def test_close_waits_for_queued_appends(log_dir: Path) -> None:
    io = ControlledIO()
    wal = await walasync.open(log_dir, io=io, max_pending_bytes=2_000)
    first = await hold(io, wal)
    tasks = [asyncio.ensure_future(wal.append(b"%04d" % i * 10)) for i in range(300)]
    await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(wal.close())
    # Until the close task's first step, appends still go through (a bug: see
    # test_wal.py::test_appends_once_close_has_begun_raise_closed_error).
    await until(lambda: wal._batcher.closing, "the close to begin")
    with pytest.raises(walasync.ClosedError):
        await wal.append(b"too late")
    io.gate.set()
    await closing
    assert await first == 1
    assert sorted(await asyncio.gather(*tasks)) == list(range(2, 302))
    async with walasync.open(log_dir) as wal:
        assert wal.last_lsn == 301


async def test_close_is_shielded_from_cancellation(log_dir: Path) -> None:
    io = ControlledIO()
    wal = await walasync.open(log_dir, io=io)
    first = await hold(io, wal)
    closer = asyncio.ensure_future(wal.close())
    await asyncio.sleep(0.01)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    io.gate.set()
    assert await first == 1  # the close went on: the append finished durably
    await wal.close()
    async with walasync.open(log_dir) as again:  # and the lock was released
        assert again.last_lsn == 1


async def test_interval_mode_acks_before_fdatasync_and_syncs_in_background(
    log_dir: Path,
) -> None:
    io = ControlledIO()
    # A sync interval longer than the test: appends are acknowledged with no fdatasync.
    # (Counting fdatasyncs against a short interval would count the machine's speed.)
    opts: dict[str, Any] = {"durability": Durability.INTERVAL, "sync_interval": 60}
    async with walasync.open(log_dir, io=io, **opts) as wal:
        syncs = io.fdatasyncs
        lsns = [await wal.append(b"%d" % i) for i in range(50)]
        assert lsns == list(range(1, 51))
        assert io.fdatasyncs == syncs and wal.synced_lsn == 0
        await wal.sync()
        assert io.fdatasyncs == syncs + 1 and wal.synced_lsn == 50
    # A short interval: the background sync catches up on its own.
    opts = {"durability": Durability.INTERVAL, "sync_interval": 0.02}
    async with walasync.open(log_dir, io=io, **opts) as wal:
        lsns = [await wal.append(b"%d" % i) for i in range(50, 100)]
        assert lsns == list(range(51, 101))
        await until(lambda: wal.synced_lsn == 100, "the background sync")
        await wal.append(b"more")
        await wal.sync()
        assert wal.synced_lsn == 101


async def test_none_mode_never_fdatasyncs_unless_asked(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io, durability="none") as wal:
        syncs = io.fdatasyncs
        for i in range(100):
            await wal.append(b"%d" % i)
        await asyncio.sleep(0.05)
        assert io.fdatasyncs == syncs and wal.synced_lsn == 0 and wal.last_lsn == 100
        await wal.sync()
        assert io.fdatasyncs == syncs + 1 and wal.synced_lsn == 100
    async with walasync.open(log_dir) as wal:
        assert wal.last_lsn == 100


async def test_sync_in_fsync_mode_waits_for_queued_appends(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        first = await hold(io, wal)
        tasks = [asyncio.ensure_future(wal.append(b"x")) for _ in range(10)]
        await asyncio.sleep(0)
        syncer = asyncio.ensure_future(wal.sync())
        await asyncio.sleep(0.01)
        assert not syncer.done()
        io.gate.set()
        await syncer
        assert wal.synced_lsn == 11 and all(t.done() for t in tasks)
        await first


class FullDisk(ControlledIO):
    """Runs out of space while preallocating new segments, until `full` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def preallocate(self, fd: int, size: int) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().preallocate(fd, size)


async def test_disk_full_at_rotation_fails_the_batch_and_recovers_in_place(
    log_dir: Path,
) -> None:
    io = FullDisk()
    async with walasync.open(log_dir, io=io, **small()) as wal:
        io.full = True  # from now on no new segment can be zero-filled
        for i in range(3):
            assert await wal.append(b"%d" % i * 1000) == i + 1  # fits in the first segment
        with pytest.raises(walasync.DiskFullError) as info:
            await wal.append(b"x" * 1500)  # needs a second segment
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC
        with pytest.raises(walasync.DiskFullError):
            await wal.append_many([b"y" * 1000, b"z" * 1000])
        assert wal.last_lsn == 3 and "open" in repr(wal)
        await wal.sync()  # a sync does not wait for records that were never written
        assert not (log_dir / "spare.tmp").exists()  # no half-made segment left behind
        io.full = False  # space freed: the log goes on in place, with dense LSNs
        assert await wal.append(b"after" * 300) == 4
        assert await wal.append_many([b"a" * 1000, b"b" * 1000]) == range(5, 7)
    async with walasync.open(log_dir, **small()) as wal:
        got = [r.data async for r in wal.read()]
    assert got == [b"0" * 1000, b"1" * 1000, b"2" * 1000, b"after" * 300, b"a" * 1000, b"b" * 1000]


async def test_disk_full_with_appends_queued_behind_fails_each_batch_cleanly(
    log_dir: Path,
) -> None:
    io = FullDisk()
    async with walasync.open(log_dir, io=io, **small()) as wal:
        io.full = True
        await wal.append(b"a" * 3000)
        results = await asyncio.gather(
            *(wal.append(b"%d" % i * 900) for i in range(20)), return_exceptions=True
        )
        ok = [r for r in results if isinstance(r, int)]
        assert all(isinstance(r, (int, walasync.DiskFullError)) for r in results)
        assert sorted(ok) == list(range(2, 2 + len(ok)))  # dense: no LSN was skipped
        syncing = asyncio.ensure_future(wal.sync())
        await asyncio.wait_for(syncing, 10)
        io.full = False
        assert await wal.append(b"later") == 2 + len(ok)


class HeldFullDisk(FullDisk):
    """A full disk whose preallocation (the only way to a new segment) waits at `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.release.set()

    def preallocate(self, fd: int, size: int) -> None:
        self.release.wait(30)
        super().preallocate(fd, size)


async def test_disk_full_with_a_batch_queued_behind_fails_both_and_keeps_lsns_dense(
    log_dir: Path,
) -> None:
    io = HeldFullDisk()
    async with walasync.open(log_dir, io=io, **small()) as wal:
        io.full = True
        io.release.clear()
        assert await wal.append(b"a" * 2500) == 1  # past half: the spare is being made
        rotating = asyncio.ensure_future(wal.append(b"b" * 2500))  # needs that spare
        await until(lambda: wal._batcher.in_flight == 1, "the rotating batch to be sent")
        behind = [asyncio.ensure_future(wal.append(b"c%d" % i)) for i in range(5)]
        # Two batches in flight, the second with LSNs 3..7.
        await until(lambda: wal._batcher.in_flight == 6, "the batch behind to be sent")
        io.release.set()
        results = await asyncio.gather(rotating, *behind, return_exceptions=True)
        assert all(isinstance(r, walasync.DiskFullError) for r in results), results
        assert wal.last_lsn == 1 and "open" in repr(wal)
        io.full = False
        assert await wal.append(b"after") == 2  # the refused LSNs were reused
        assert await wal.append(b"d" * 2500) == 3  # and rotation works again
    async with walasync.open(log_dir, **small()) as wal:
        assert [r.data async for r in wal.read()] == [b"a" * 2500, b"after", b"d" * 2500]


@pytest.mark.parametrize("durability", ["none", "interval"])
async def test_sync_in_relaxed_modes_survives_power_loss_across_segments(durability: str) -> None:
    from walasync.testing import SimulatedDisk

    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    opts = {"durability": durability, "sync_interval": 60, **small()}
    records = [b"%02d" % i * 600 for i in range(20)]  # several segments
    async with walasync.open("/data/log", io=disk, **opts) as wal:
        for data in records:
            await wal.append(data)
        await wal.sync()
        power_loss = disk.crash()  # everything appended before sync() returned must survive
        await wal.append(b"not synced")
    async with walasync.open("/data/log", io=power_loss, **small()) as wal:
        assert [r.data async for r in wal.read()] == records
