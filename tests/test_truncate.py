"""Removing records: `truncate_front`, where a log starts (`first_lsn`), and META."""

from __future__ import annotations

import asyncio
import logging
import os
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import segment_files, small, until

import walasync
from walasync import CorruptionError, Record, TruncatedError


def record(i: int) -> bytes:
    return b"record %d|" % i + bytes(150)


async def fill(wal: walasync.Wal, n: int) -> list[int]:
    return [await wal.append(record(wal.last_lsn + 1)) for _ in range(n)]


async def read_all(wal: walasync.Wal, start: int | None = None) -> list[Record]:
    return [r async for r in wal.read(start)]


def firsts(path: Path) -> list[int]:
    return [int(p.stem) for p in segment_files(path)]


async def test_truncate_front_removes_records_and_whole_segments(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 200)
        before = firsts(log_dir)
        assert len(before) > 5
        cut = 100
        await wal.truncate_front(cut)
        assert wal.first_lsn == cut
        after = firsts(log_dir)
        # Exactly the segments holding only records below `cut` are gone.
        assert after == [
            f for i, f in enumerate(before) if i + 1 == len(before) or before[i + 1] > cut
        ]
        assert after[0] <= cut
        assert [r.lsn for r in await read_all(wal)] == list(range(cut, 201))
        assert (await read_all(wal, 150))[0] == Record(150, record(150))
        with pytest.raises(TruncatedError):
            wal.read(cut - 1)
        assert await wal.append(record(201)) == 201
    async with walasync.open(log_dir, **small()) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (cut, 201)
        assert [r.data for r in await read_all(wal)] == [record(i) for i in range(cut, 202)]


async def test_truncating_everything_keeps_the_lsn_sequence(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 60)
        await wal.truncate_front(61)
        assert (wal.first_lsn, wal.last_lsn) == (61, 60)
        assert await read_all(wal) == []
        assert len(segment_files(log_dir)) == 1  # the last segment stays
        assert await wal.append(b"next") == 61
    async with walasync.open(log_dir, **small()) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (61, 61)
        assert await read_all(wal) == [Record(61, b"next")]


async def test_truncate_front_bounds(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 30)
        for bad in (0, -1, 32):
            with pytest.raises(ValueError):
                await wal.truncate_front(bad)
        await wal.truncate_front(10)
        await wal.truncate_front(5)  # below first_lsn: nothing to do
        await wal.truncate_front(10)
        assert wal.first_lsn == 10
        assert [r.lsn for r in await read_all(wal)] == list(range(10, 31))


async def test_truncate_front_while_appending_and_reading(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 300)
        stop = asyncio.Event()
        acked: list[int] = []

        async def appender() -> None:
            while not stop.is_set():
                acked.append(await wal.append(b"more"))

        tasks = [asyncio.ensure_future(appender()) for _ in range(20)]
        behind = wal.read(1)  # will be left behind by the truncation
        first = await behind.__anext__()
        past = wal.read(250, 300)  # starts past what is removed: unaffected
        await wal.truncate_front(200)
        with pytest.raises(TruncatedError):
            async for _ in behind:
                pass
        assert first == Record(1, record(1))
        assert [r.lsn async for r in past] == list(range(250, 301))
        stop.set()
        await asyncio.gather(*tasks)
        assert sorted(acked) == list(range(301, 301 + len(acked)))
        got = await read_all(wal)
    assert [r.lsn for r in got] == list(range(200, 301 + len(acked)))


async def test_a_new_log_can_start_at_any_lsn(log_dir: Path) -> None:
    async with walasync.open(log_dir, first_lsn=1000, **small()) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (1000, 999)
        assert await wal.append(b"a") == 1000
        await fill(wal, 50)
    assert firsts(log_dir)[0] == 1000
    async with walasync.open(log_dir, first_lsn=1000, **small()) as wal:
        assert wal.last_lsn == 1050
        await wal.truncate_front(1020)
    async with walasync.open(log_dir, first_lsn=1000, **small()) as wal:  # still its origin
        assert wal.first_lsn == 1020
    with pytest.raises(ValueError, match="starts at LSN 1000"):
        await walasync.open(log_dir, first_lsn=1)
    for bad in (0, -5):
        with pytest.raises(ValueError):
            walasync.open(log_dir, first_lsn=bad)
    async with walasync.open(log_dir) as wal:
        assert wal.first_lsn == 1020


async def test_a_log_from_before_meta_gets_one(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 40)
    (log_dir / "META").unlink()
    async with walasync.open(log_dir, **small()) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (1, 40)
    assert (log_dir / "META").exists()
    with pytest.raises(ValueError):  # it started at 1
        await walasync.open(log_dir, first_lsn=7)


async def test_damaged_meta_is_corruption(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"x")
    meta = log_dir / "META"
    data = bytearray(meta.read_bytes())
    data[40] ^= 1  # first LSN
    meta.write_bytes(bytes(data))
    with pytest.raises(CorruptionError) as info:
        await walasync.open(log_dir)
    assert info.value.path == str(meta)


async def test_a_log_whose_segments_are_all_gone_is_corruption(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 40)
        await wal.truncate_front(20)
    for segment in segment_files(log_dir):
        segment.unlink()
    with pytest.raises(CorruptionError, match="no segment files left"):
        await walasync.open(log_dir)
    assert not segment_files(log_dir)  # and no new log was made over it


async def test_a_lost_first_segment_is_corruption(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 80)
        await wal.truncate_front(2)
    segment_files(log_dir)[0].unlink()
    with pytest.raises(CorruptionError, match="records 2 to"):
        await walasync.open(log_dir, **small())


async def test_segments_a_truncation_did_not_delete_are_deleted_at_open(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 80)
    kept = {p.name: p.read_bytes() for p in segment_files(log_dir)}
    async with walasync.open(log_dir, **small()) as wal:
        await wal.truncate_front(60)
    for name, data in kept.items():  # as if the writer died right after META
        if not (log_dir / name).exists():
            (log_dir / name).write_bytes(data)
    async with walasync.open(log_dir, **small()) as wal:
        assert wal.first_lsn == 60
        assert firsts(log_dir)[0] <= 60 < [*firsts(log_dir), 10**9][1]
        assert [r.lsn for r in await read_all(wal)] == list(range(60, 81))


def test_meta_leftover_temporary_file_is_removed(log_dir: Path) -> None:
    async def main() -> None:
        async with walasync.open(log_dir) as wal:
            await wal.append(b"x")
        (log_dir / "META.tmp").write_bytes(b"half")
        async with walasync.open(log_dir) as wal:
            assert wal.last_lsn == 1
        assert not (log_dir / "META.tmp").exists()

    asyncio.run(main())
    assert os.path.exists(log_dir / "META")


# -- retention -----------------------------------------------------------------------------


async def test_retention_by_bytes_keeps_the_log_under_its_limit(log_dir: Path) -> None:
    dropped: list[walasync.SegmentInfo] = []

    async def hook(segment: walasync.SegmentInfo) -> None:
        # Still there: the hook may copy it.
        assert await asyncio.to_thread(os.path.exists, segment.path)
        dropped.append(segment)

    async with walasync.open(
        log_dir, retention_bytes=5 * 4096, on_segment_drop=hook, **small()
    ) as wal:
        for _ in range(300):
            await wal.append(record(wal.last_lsn + 1))
        await wal.apply_retention()  # the pass after the last rotation may still run
        sizes = [p.stat().st_size for p in segment_files(log_dir)]
        assert sum(sizes) - sizes[-1] <= 5 * 4096  # over the limit only by the last
        assert dropped and [d.first_lsn for d in dropped] == sorted(d.first_lsn for d in dropped)
        assert wal.first_lsn == dropped[-1].last_lsn + 1 == firsts(log_dir)[0]
        assert [r.lsn for r in await read_all(wal)] == list(range(wal.first_lsn, 301))
    for a, b in pairwise(dropped):
        assert b.first_lsn == a.last_lsn + 1


async def test_retention_by_age(log_dir: Path) -> None:
    async with walasync.open(log_dir, retention_age=3600, **small()) as wal:
        await fill(wal, 100)
        assert await wal.apply_retention() == []  # nothing is an hour old
        old = segment_files(log_dir)[:3]
        for path in old:
            os.utime(path, (1, 1))
        gone = await wal.apply_retention()
        assert [g.path for g in gone] == [str(p) for p in old]
        assert wal.first_lsn == gone[-1].last_lsn + 1


async def test_the_hook_can_veto_and_a_failing_hook_stops_the_pass(log_dir: Path) -> None:
    calls: list[int] = []
    verdict: dict[str, object] = {"keep": False}

    async def hook(segment: walasync.SegmentInfo) -> bool | None:
        calls.append(segment.first_lsn)
        if verdict.get("raise"):
            raise OSError("archive unreachable")
        return False if verdict["keep"] is True else None

    async with walasync.open(log_dir, retention_age=1e-9, on_segment_drop=hook, **small()) as wal:
        verdict["keep"] = True  # vetoes every drop: the log keeps everything
        await fill(wal, 100)
        assert await wal.apply_retention() == []
        assert wal.first_lsn == 1 and calls
        verdict.update({"keep": False, "raise": True})
        with pytest.raises(OSError, match="archive unreachable"):
            await wal.apply_retention()
        assert wal.first_lsn == 1
        assert await wal.append(b"still working") == 101
        verdict["raise"] = False
        gone = await wal.apply_retention()
        assert gone
        assert wal.first_lsn == gone[-1].last_lsn + 1
        assert len(segment_files(log_dir)) == 1  # everything sealed went


async def test_a_failing_hook_in_the_pass_after_a_rotation_is_logged_and_retried(
    log_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The pass that runs by itself after a rotation has no caller to raise to: a hook
    failing there is logged (a WARNING naming the segment and the error, with the
    traceback); the segment stays, appends go on, and a later pass drops it."""
    shown: list[walasync.SegmentInfo] = []
    failing = True

    async def hook(segment: walasync.SegmentInfo) -> None:
        shown.append(segment)
        if failing:
            raise OSError("archive unreachable")

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("retention of")]

    caplog.set_level(logging.WARNING, logger="walasync")
    async with walasync.open(log_dir, retention_bytes=1, on_segment_drop=hook, **small()) as wal:
        while len(segment_files(log_dir)) < 2:
            await fill(wal, 1)
        await until(warnings, "the failed pass to be logged")
        first = shown[0]
        assert first.first_lsn == 1
        warning = warnings()[0]
        assert warning.levelno == logging.WARNING and warning.name == "walasync"
        assert first.path in warning.getMessage()
        assert "archive unreachable" in warning.getMessage()
        assert warning.exc_info is not None and isinstance(warning.exc_info[1], OSError)
        assert wal.first_lsn == 1 and await asyncio.to_thread(os.path.exists, first.path)
        last = wal.last_lsn
        assert await fill(wal, 3) == [last + 1, last + 2, last + 3]
        failing = False
        while wal.first_lsn == 1:  # appends rotate again, and that pass succeeds
            await fill(wal, 1)
            await asyncio.sleep(0)
        assert [s.first_lsn for s in shown].count(1) >= 2  # shown again
        assert wal.first_lsn > first.last_lsn
        assert not await asyncio.to_thread(os.path.exists, first.path)


async def test_retention_never_drops_what_is_not_durable(log_dir: Path) -> None:
    async with walasync.open(log_dir, durability="none", retention_age=1e-9, **small()) as wal:
        await fill(wal, 100)
        assert wal.synced_lsn == 0
        assert await wal.apply_retention() == []
        await wal.sync()
        assert await wal.apply_retention()


async def test_retention_options_are_checked(log_dir: Path) -> None:
    for bad in ({"retention_bytes": 0}, {"retention_age": -1}, {"retention_bytes": "1"}):
        with pytest.raises(ValueError):
            walasync.open(log_dir, **bad)
    async with walasync.open(log_dir) as wal:
        assert await wal.apply_retention() == []  # no retention set


# -- truncate_back ---------------------------------------------------------------------------


async def test_truncate_back_across_segments(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 200)
        many = len(segment_files(log_dir))
        await wal.truncate_back(120)
        assert (wal.first_lsn, wal.last_lsn, wal.synced_lsn) == (1, 120, 120)
        assert len(segment_files(log_dir)) < many
        assert [r.data for r in await read_all(wal)] == [record(i) for i in range(1, 121)]
        assert await wal.append(b"new 121") == 121
        await fill(wal, 100)  # rotates again from the cut segment
    async with walasync.open(log_dir, **small()) as wal:
        got = await read_all(wal)
    assert [r.lsn for r in got] == list(range(1, 222))
    assert got[119] == Record(120, record(120)) and got[120] == Record(121, b"new 121")


async def test_truncate_back_inside_a_batch(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        lsns = await asyncio.gather(*(wal.append(b"c%d" % i) for i in range(30)))
        by_lsn = {lsn: b"c%d" % i for i, lsn in enumerate(lsns)}
        await wal.truncate_back(17)  # most likely inside the batch of 30
        assert [r.data for r in await read_all(wal)] == [by_lsn[i] for i in range(1, 18)]
        assert await wal.append(b"after") == 18
    async with walasync.open(log_dir, **small()) as wal:
        assert [r.data for r in await read_all(wal)] == [
            *[by_lsn[i] for i in range(1, 18)],
            b"after",
        ]


async def test_truncate_back_never_splits_a_unit(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        assert await wal.append_many([b"a", b"b", b"c"]) == range(1, 4)
        await wal.append(b"d")
        for inside in (1, 2):
            with pytest.raises(ValueError, match="unit"):
                await wal.truncate_back(inside)
        assert wal.last_lsn == 4
        await wal.truncate_back(3)
        assert wal.last_lsn == 3
    async with walasync.open(log_dir) as wal:  # unit ends are on disk: known after reopen
        with pytest.raises(ValueError, match="unit"):
            await wal.truncate_back(2)
        await wal.truncate_back(0)
        assert (wal.first_lsn, wal.last_lsn) == (1, 0)
        assert await wal.append(b"again") == 1


async def test_truncate_back_bounds(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 60)
        await wal.truncate_front(20)
        for bad in (18, 61, -1):
            with pytest.raises(ValueError):
                await wal.truncate_back(bad)
        await wal.truncate_back(60)  # nothing after it: nothing to do
        assert wal.last_lsn == 60
        await wal.truncate_back(19)  # everything
        assert (wal.first_lsn, wal.last_lsn) == (20, 19)
        assert await read_all(wal) == []
        assert await wal.append(b"x") == 20
    async with walasync.open(log_dir, **small()) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (20, 20)


async def test_appends_during_truncate_back_follow_the_cut(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 100)
        stop = False
        cut = False
        before: dict[int, bytes] = {}  # acknowledged before truncate_back returned
        after: dict[int, bytes] = {}  # and after

        async def appender(n: int) -> None:
            i = 0
            while not stop:
                data = b"w%d.%d" % (n, i)
                lsn = await wal.append(data)
                (after if cut else before)[lsn] = data
                i += 1

        tasks = [asyncio.ensure_future(appender(n)) for n in range(30)]
        await until(lambda: len(before) >= 30, "appends before the cut")
        behind = wal.read(1)
        await behind.__anext__()
        await wal.truncate_back(80)
        cut = True
        await until(lambda: len(after) >= 30, "appends after the cut")
        stop = True
        await asyncio.gather(*tasks)
        with pytest.raises(TruncatedError):
            async for _ in behind:
                pass
        got = {r.lsn: r.data for r in await read_all(wal)}
    assert before and after
    assert sorted(got) == list(range(1, len(got) + 1))
    assert [got[lsn] for lsn in range(1, 81)] == [record(lsn) for lsn in range(1, 81)]
    assert min(after) == 81  # the first append after the cut gets 81, and all are there
    assert all(got[lsn] == data for lsn, data in after.items())
    assert min(before) == 101  # the appends before it were written first, then cut


# -- followers and truncation ------------------------------------------------------------------


async def test_a_follower_left_behind_by_truncate_front_gets_truncated_error(
    log_dir: Path,
) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 100)
        follower = wal.read(1, follow=True)
        assert (await follower.__anext__()).lsn == 1
        await wal.truncate_front(90)
        with pytest.raises(TruncatedError):
            async for _ in follower:
                pass


async def test_followers_and_truncate_back(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 50)
        ahead = wal.read(1, follow=True)  # will have yielded records the cut removes
        got_ahead = [await ahead.__anext__() for _ in range(50)]
        behind = wal.read(1, follow=True)  # will not have: it reads on, seamlessly
        got_behind = [await behind.__anext__() for _ in range(30)]
        await wal.truncate_back(40)
        await wal.append(b"after the cut")
        with pytest.raises(TruncatedError):
            await ahead.__anext__()
        got_behind += [await behind.__anext__() for _ in range(11)]
        await behind.aclose()
    assert [r.lsn for r in got_ahead] == list(range(1, 51))
    assert [r.data for r in got_behind] == [record(i) for i in range(1, 41)] + [b"after the cut"]
