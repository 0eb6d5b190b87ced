"""`Wal.stats()`: counters, histograms and state, and the warnings walasync logs (a slow
durable write, a log that breaks, a torn tail cut at open).

Latencies are checked against bounds the test itself measured around the appends (a held
fdatasync gives a floor, the test's own clock a ceiling), never against a speed."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import math
import subprocess
import sys
import threading
import time
from bisect import bisect_left
from pathlib import Path

import pytest
from conftest import segment_files, small, until
from hypothesis import given, settings
from hypothesis import strategies as st
from iofaults import ControlledIO

import walasync
from walasync import BrokenLogError, Durability, Histogram, Stats
from walasync import _format as fmt
from walasync._stats import RECORD_BOUNDS, SECOND_BOUNDS, Buckets
from walasync.testing import SimulatedDisk

WIDEST = 1.15  # over the widest ratio of two adjacent bounds of SECOND_BOUNDS (1.6 / 1.4)


def warnings_of(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "walasync" and r.levelno == level]


async def settled(wal: walasync.Wal, appends: int) -> Stats:
    """The stats once `appends` latencies are counted (they are, just after the appenders
    resume: see `Batcher._woken`)."""
    await until(lambda: wal.stats().append_seconds.count == appends, "latencies counted")
    return wal.stats()


def disk_usage(path: Path) -> tuple[int, int]:
    files = segment_files(path)
    return len(files), sum(f.stat().st_size for f in files)


# -- histograms ------------------------------------------------------------------------------


def test_bounds_are_decimal_and_ascending() -> None:
    assert SECOND_BOUNDS[0] == 1e-6 and SECOND_BOUNDS[-1] == 100.0 and len(SECOND_BOUNDS) == 161
    assert 2.5e-4 in SECOND_BOUNDS and 5e-3 in SECOND_BOUNDS  # Prometheus's usual bounds
    ratios = [b / a for a, b in itertools.pairwise(SECOND_BOUNDS)]
    assert 1.11 < min(ratios) and max(ratios) < WIDEST
    assert RECORD_BOUNDS[:13] == (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20)
    assert {float(2**k) for k in range(21)} <= set(RECORD_BOUNDS) and RECORD_BOUNDS[-1] == 2**20


def test_a_value_on_a_bound_counts_in_that_bound_s_bucket() -> None:
    b = Buckets(RECORD_BOUNDS)
    for value in (1, 2, 3, 3, 4, 9, 10, 2**20, 2**20 + 1):
        b.add(value)
    h = b.snapshot()
    assert h.counts[:9] == (1, 1, 2, 1, 0, 0, 0, 0, 2) and h.counts[-2:] == (1, 1)
    assert h.count == 9 and h.sum == 32 + 2**21 + 1
    assert h.cumulative((1.0, 4.0)) == [(1.0, 1), (4.0, 5), (math.inf, 9)]
    assert h.quantile(1) == 2**20  # the overflow bucket reads as the last bound


def test_an_empty_histogram_has_no_quantiles() -> None:
    h = Buckets(SECOND_BOUNDS).snapshot()
    assert isinstance(h, Histogram) and type(h).__module__ == "walasync"
    assert (h.count, h.mean, h.quantile(0.5)) == (0, None, None)
    assert repr(h) == "Histogram(count=0)"
    with pytest.raises(ValueError):
        h.quantile(1.5)


def test_a_quantile_is_interpolated_inside_its_bucket() -> None:
    b = Buckets(SECOND_BOUNDS)
    for _ in range(4):
        b.add(1.05)  # in (1, 1.12]
    assert b.snapshot().quantile(0.5) == pytest.approx(1.12**0.5)  # half way, geometrically
    assert b.snapshot().quantile(1) == pytest.approx(1.12)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(1.1e-6, 99.0), min_size=1, max_size=300),  # above the first bucket
    st.sampled_from([0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0]),
)
def test_quantiles_are_within_one_bucket(values: list[float], q: float) -> None:
    b = Buckets(SECOND_BOUNDS)
    for v in values:
        b.add(v)
    h = b.snapshot()
    ranked = sorted(values)
    true = ranked[max(math.ceil(q * len(ranked)), 1) - 1]  # nearest rank
    got = h.quantile(q)
    assert got is not None
    assert true / WIDEST <= got <= true * WIDEST
    assert h.count == len(values) and h.mean == pytest.approx(sum(values) / len(values))


@settings(max_examples=150, deadline=None)
@given(st.floats(1.1e-6, 50.0), st.floats(1.0, 2.0), st.integers(1, 1000))
def test_spread_counts_n_values_evenly_over_the_range(low: float, ratio: float, n: int) -> None:
    high = low * ratio
    b = Buckets(SECOND_BOUNDS)
    b.spread(low, high, n)
    h = b.snapshot()
    assert h.count == n and h.sum == pytest.approx(n * (low + high) / 2)
    used = [i for i, c in enumerate(h.counts) if c]
    assert all(c >= 0 for c in h.counts)
    assert (
        bisect_left(SECOND_BOUNDS, low) <= used[0] <= used[-1] <= bisect_left(SECOND_BOUNDS, high)
    )
    # Even: the share at most any bound inside the range is its share of the range (±1).
    for i in used[:-1]:
        below = sum(h.counts[: i + 1])
        assert abs(below - n * (SECOND_BOUNDS[i] - low) / (high - low)) <= 1
    median = h.quantile(0.5)
    assert median is not None and low / WIDEST <= median <= high * WIDEST


# -- counters and state ----------------------------------------------------------------------


async def test_counts_acknowledged_appends_records_bytes_and_batches(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        empty = wal.stats()
        assert (empty.appends, empty.batches, empty.records_per_batch) == (0, 0, None)
        assert empty.append_p50 is None and (empty.first_lsn, empty.last_lsn) == (1, 0)
        for i in range(3):
            await wal.append(b"x" * (10 + i))
        await wal.append_many([b"a" * 5, b"b" * 7])
        await wal.append_many([])
        s = await settled(wal, 4)
        assert (s.appends, s.records, s.appended_bytes, s.batches) == (4, 5, 45, 4)
        assert s.batch_records.counts[:3] == (3, 1, 0) and s.records_per_batch == 1.25
        assert s.sync_seconds.count == 4  # one durable write per batch
        assert (s.first_lsn, s.last_lsn, s.synced_lsn) == (1, 5, 5)
        assert (s.pending_records, s.pending_bytes, s.in_flight_records) == (0, 0, 0)
        assert (s.waiting_appenders, s.slow_syncs) == (0, 0)
        assert (s.segments, s.disk_bytes) == (1, 4096)
        assert not s.broken and s.failure is None and not s.closed
        assert s.path == str(log_dir) and s.append_p50 is not None and s.append_p999 is not None
    closed = wal.stats()  # after close too: the final counts
    assert closed.closed and closed.records == 5


async def test_a_batch_counts_once_with_all_its_records(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        io.gate.clear()
        first = asyncio.ensure_future(wal.append(b"held"))
        assert await asyncio.to_thread(io.entered_fdatasync.wait, 10)
        rest = [asyncio.ensure_future(wal.append(b"r%d" % i)) for i in range(10)]
        unit = asyncio.ensure_future(wal.append_many([b"u1", b"u2", b"u3"]))
        await until(lambda: wal.stats().in_flight_records == 14, "the second batch sent")
        io.gate.set()
        await asyncio.gather(first, unit, *rest)
        s = await settled(wal, 12)
        assert (s.appends, s.records, s.batches) == (12, 14, 2)
        assert s.appended_bytes == 4 + 10 * 2 + 3 * 2  # b"held", b"r0"..b"r9", the unit
        sizes = s.batch_records.counts
        assert sizes[0] == 1 and sizes[bisect_left(RECORD_BOUNDS, 13)] == 1 and sum(sizes) == 2
        assert s.batch_records.sum == 14


async def test_queue_in_flight_and_waiting_appenders(log_dir: Path) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io, max_pending_bytes=250) as wal:
        io.gate.clear()
        tasks = [asyncio.ensure_future(wal.append(b"a" * 100))]
        assert await asyncio.to_thread(io.entered_fdatasync.wait, 10)
        tasks.append(asyncio.ensure_future(wal.append(b"b" * 100)))  # the second batch
        await until(lambda: wal.stats().in_flight_records == 2, "two batches in flight")
        tasks += [asyncio.ensure_future(wal.append(b"%d" % i * 100)) for i in range(3)]
        await until(lambda: wal.stats().waiting_appenders == 1, "the third to wait")
        s = wal.stats()
        assert (s.in_flight_records, s.pending_records, s.pending_bytes) == (2, 2, 208)
        assert s.last_lsn == 0 and repr(wal).count("pending=2 in_flight=2") == 1
        io.gate.set()
        await asyncio.gather(*tasks)
        s = await settled(wal, 5)
        assert (s.in_flight_records, s.pending_records, s.waiting_appenders) == (0, 0, 0)
        assert s.records == 5


async def test_stats_can_be_read_from_another_thread(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"x")
        s = await asyncio.to_thread(wal.stats)
        assert isinstance(s, Stats) and s.last_lsn == 1


# -- append latency --------------------------------------------------------------------------


async def test_append_latency_lies_between_what_the_test_measured(log_dir: Path) -> None:
    """A held fdatasync makes the floor; the test's own clock around the append the ceiling."""
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        io.gate.clear()
        start = time.perf_counter()
        fut = asyncio.ensure_future(wal.append(b"x"))
        assert await asyncio.to_thread(io.entered_fdatasync.wait, 10)
        queued = time.perf_counter()  # the record was queued before now
        await until(lambda: time.perf_counter() - queued > 0.05, "50 ms held")
        io.gate.set()
        await fut
        s = await settled(wal, 1)
        took = time.perf_counter() - start
        low, high = s.append_seconds.quantile(0), s.append_seconds.quantile(1)
        assert low is not None and high is not None
        assert 0.05 / WIDEST <= low <= high <= took * WIDEST
        assert 0.05 <= s.append_seconds.sum <= took
        sync = s.sync_seconds.quantile(1)
        assert sync is not None and 0.05 / WIDEST <= sync <= took * WIDEST


async def test_an_append_after_an_idle_log_counts_from_its_own_queueing(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"first")
        before = await settled(wal, 1)
        idle = time.perf_counter()
        await until(lambda: time.perf_counter() - idle > 0.3, "an idle 0.3 s")
        start = time.perf_counter()
        await wal.append(b"second")
        after = await settled(wal, 2)
        took = time.perf_counter() - start
        second = [
            a - b
            for a, b in zip(after.append_seconds.counts, before.append_seconds.counts, strict=True)
        ]
        (bucket,) = [i for i, n in enumerate(second) if n]
        assert SECOND_BOUNDS[bucket - 1] <= took  # not the idle time before it


async def test_an_append_waits_until_its_appender_runs_again(log_dir: Path) -> None:
    """The latency runs to when the appender resumes: here the first of two appenders of one
    batch holds the loop for 50 ms before the second resumes."""
    async with walasync.open(log_dir) as wal:

        async def hog() -> None:
            await wal.append(b"first")
            until = time.perf_counter() + 0.05
            while time.perf_counter() < until:  # busy: the loop runs nothing else
                pass

        await asyncio.gather(hog(), wal.append(b"second"))  # queued in one loop pass
        s = await settled(wal, 2)
        assert s.batches == 1
        # Counted as spread evenly between the first's wait and the second's: together at
        # least the 50 ms the second waited (the sum is exact, not bucketed).
        assert s.append_seconds.sum >= 0.05


async def test_many_appenders_are_all_counted(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        start = time.perf_counter()

        async def appender() -> None:
            for _ in range(20):
                await wal.append(b"y" * 50)

        await asyncio.gather(*(appender() for _ in range(300)))  # chunks of 128 woken
        s = await settled(wal, 6000)
        took = time.perf_counter() - start
        assert s.records == s.appends == s.batch_records.sum == 6000
        high = s.append_seconds.quantile(1)
        assert high is not None and high <= took * WIDEST


# -- warnings --------------------------------------------------------------------------------


async def test_every_slow_durable_write_is_counted_and_logged(
    log_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "walasync")
    async with walasync.open(log_dir, slow_sync_warning=0) as wal:
        for _ in range(3):
            await wal.append(b"z" * 100)
        assert wal.stats().slow_syncs == 3
    messages = warnings_of(caplog)
    assert len(messages) == 3
    name = segment_files(log_dir)[0].name
    assert all("a durable write of 128 bytes to " + name in m for m in messages), messages
    assert all(str(log_dir) in m and "slow_sync_warning" in m for m in messages)


async def test_a_slow_fdatasync_of_a_relaxed_mode_is_logged(
    log_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "walasync")
    async with walasync.open(log_dir, durability=Durability.NONE, slow_sync_warning=0) as wal:
        await wal.append(b"z")
        assert warnings_of(caplog) == [] and wal.stats().sync_seconds.count == 0
        await wal.sync()
        assert wal.stats().slow_syncs == 1 and wal.stats().sync_seconds.count == 1
    assert any("an fdatasync to" in m for m in warnings_of(caplog))


async def test_a_write_over_the_threshold_warns_and_none_turns_it_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "walasync")
    for threshold, warned in ((0.04, True), (None, False)):
        caplog.clear()
        disk = SimulatedDisk()
        async with walasync.open("/log", io=disk, slow_sync_warning=threshold) as wal:
            disk.slow("fdatasync", 0.05)  # the sleep makes each write at least this long
            await wal.append(b"slow")
            disk.slow("fdatasync", 0)
            assert (wal.stats().slow_syncs >= 1) is warned
        assert bool(warnings_of(caplog)) is warned


@pytest.mark.parametrize("value", [-1, True, "1", math.nan])
def test_slow_sync_warning_must_be_a_number_or_none(value: object) -> None:
    with pytest.raises(ValueError, match="slow_sync_warning"):
        walasync.Options(slow_sync_warning=value)  # type: ignore[arg-type]


async def test_breaking_is_logged_once_with_its_cause(
    log_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    io = ControlledIO()
    async with walasync.open(log_dir, io=io) as wal:
        io.gate.clear()
        first = asyncio.ensure_future(wal.append(b"fails"))
        assert await asyncio.to_thread(io.entered_fdatasync.wait, 10)
        second = asyncio.ensure_future(wal.append(b"behind it"))
        await until(lambda: wal.stats().in_flight_records == 2, "two batches in flight")
        io.fail_fdatasync = errno.EIO
        io.gate.set()
        for fut in (first, second):
            with pytest.raises(BrokenLogError):
                await fut
        with pytest.raises(BrokenLogError):
            await wal.append(b"after")
        s = wal.stats()
        assert s.broken and isinstance(s.failure, OSError) and s.failure.errno == errno.EIO
        assert (s.records, s.batches) == (0, 0)  # failed batches count nowhere
    errors = warnings_of(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert str(log_dir) in errors[0] and "broken" in errors[0] and "Input/output error" in errors[0]


async def test_cutting_a_torn_tail_at_open_is_logged(
    log_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "walasync")
    async with walasync.open(log_dir, **small()) as wal:
        for _ in range(3):
            await wal.append(b"x" * 100)
    assert warnings_of(caplog) == []
    (segment,) = segment_files(log_dir)
    end = fmt.SEGMENT_HEADER + 3 * (fmt.BATCH_HEADER + 4 + 100)  # 3 frames of 128 bytes
    with segment.open("r+b") as f:
        f.seek(end)
        f.write(b"\xff" * 50)  # a torn write: garbage, then the preallocated zeros
    async with walasync.open(log_dir, **small()) as wal:
        assert wal.last_lsn == 3
    (message,) = warnings_of(caplog)
    assert f"{segment}: cut a torn tail at offset {end} (50 bytes)" in message
    assert "from LSN 4" in message
    caplog.clear()
    async with walasync.open(log_dir, **small()):
        pass
    assert warnings_of(caplog) == []  # repaired: nothing more to cut


def test_the_library_configures_no_logging(tmp_path: Path) -> None:
    """Warnings go to the `walasync` logger, and what becomes of them is the
    application's choice: no handler, level or root configuration is set by walasync
    (a fresh interpreter, so that pytest's own logging set-up does not hide one)."""
    script = f"""
import asyncio, logging, walasync

async def main():
    async with walasync.open({str(tmp_path / "log")!r}, slow_sync_warning=0) as wal:
        await wal.append(b"warned")  # every durable write is slow: a warning each
    async with walasync.open({str(tmp_path / "log")!r}, readonly=True):
        pass

asyncio.run(main())
for name in ("", "walasync", "walasync.jetstream"):
    log = logging.getLogger(name)
    print(name or "root", log.handlers, logging.getLevelName(log.level), log.propagate)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "root [] WARNING True",
        "walasync [] NOTSET True",
        "walasync.jetstream [] NOTSET True",
    ]
    assert "a durable write of" in result.stderr  # Python's last resort printed it


# -- segments and bytes on disk --------------------------------------------------------------


async def test_segments_and_disk_bytes_follow_the_files(log_dir: Path) -> None:
    async def check(wal: walasync.Wal) -> None:
        s = wal.stats()
        assert (s.segments, s.disk_bytes) == await asyncio.to_thread(disk_usage, log_dir)

    async with walasync.open(log_dir, **small()) as wal:
        await check(wal)
        await wal.append(b"big" * 3000)  # larger than a segment: the first grows to hold it
        for i in range(40):
            await wal.append(b"%d" % i * 200)
        await check(wal)
        assert wal.stats().segments > 4
        await wal.truncate_front(20)  # the big one is recycled: the next spare but one
        await check(wal)
        await wal.truncate_back(25)
        await check(wal)
        for _ in range(3):
            await wal.append_many([b"q" * 300] * 12)  # a segment each
            await check(wal)
    async with walasync.open(log_dir, **small()) as wal:
        # The segments sealed before open are measured in the background, just after it.
        files = await asyncio.to_thread(disk_usage, log_dir)
        await until(lambda: (wal.stats().segments, wal.stats().disk_bytes) == files, "measured")
        assert wal.stats().segments >= 3


class HeldStat(walasync.FileIO):
    """Holds `stat` (which only the background measurement calls here) until `gate` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def stat(self, path: str) -> tuple[int, float]:
        assert self.gate.wait(10)
        return super().stat(path)


@pytest.mark.parametrize("reseal", [False, True])
async def test_the_measurement_after_open_keeps_what_changed_meanwhile(
    log_dir: Path, reseal: bool
) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(60):
            await wal.append(b"%d" % i * 300)
    io = HeldStat()
    async with walasync.open(log_dir, io=io, **small()) as wal:
        await wal.truncate_back(20)  # an old sealed segment is the last one again
        if reseal:
            await wal.append_many([b"n" * 300] * 20)  # and sealed anew, with another size
        io.gate.set()
        files = await asyncio.to_thread(disk_usage, log_dir)
        await until(lambda: (wal.stats().segments, wal.stats().disk_bytes) == files, "measured")
