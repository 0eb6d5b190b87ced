"""A read-only reader while the writer cuts the log back, truncates its front and recycles
segments: it never gives a record of one history after one of another, never reports a
sound log as corrupt, and raises `TruncatedError` where records it was at or gave are gone.

A read-only reader learns of the writer's truncations from META only. The cases here are
the ones it once missed: a cut made while a read was past it (a cut keeps the segment's
file and salt, so the batches written after it pass their checksums), two cuts between two
looks (META names only the last), and the index of a sealed segment the writer then cut
and wrote again with another layout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import cancel_after, segment_files, until

import walasync
from walasync import Batch, FileIO, Record, TruncatedError
from walasync._meta import Meta
from walasync.testing import SimulatedDisk

ONE_SEGMENT = 16 << 20  # a segment size: every record in one file (a cut keeps its salt)


def a(i: int) -> bytes:
    return b"A%06d|" % i + bytes(200)


def x(i: int) -> bytes:
    return b"X%06d|" % i + bytes(200)  # as `a`: written again, the same batches and offsets


def y(i: int) -> bytes:
    return b"Y%06d|" % i + bytes(50 + i % 400)  # other sizes: another layout


async def fill(wal: walasync.Wal, make: Callable[[int], bytes], upto: int, unit: int = 50) -> None:
    """Append `make(lsn)` up to LSN `upto`, in `append_many` units (a batch each) that end
    at multiples of `unit`: after a cut at such a multiple, records of the same sizes are
    written again in the same batches at the same offsets."""
    while wal.last_lsn < upto:
        lo = wal.last_lsn + 1
        hi = min(upto, ((lo - 1) // unit + 1) * unit)
        assert await wal.append_many([make(i) for i in range(lo, hi + 1)]) == range(lo, hi + 1)


async def records(it: AsyncIterator[Record] | AsyncIterator[Batch]) -> AsyncIterator[Record]:
    async for item in it:
        if isinstance(item, Batch):
            for i, data in enumerate(item.records):
                yield Record(item.lsn + i, data)
        else:
            yield item


async def take(it: AsyncIterator[Record], n: int) -> list[Record]:
    return [await it.__anext__() for _ in range(n)]


def read(ro: walasync.ReadOnlyWal, batches: bool, *args: int, **kw: bool) -> AsyncIterator[Record]:
    return records(ro.read_batches(*args, **kw) if batches else ro.read(*args, **kw))


def one_history(got: list[Record], cut: int, new: Callable[[int], bytes] = x) -> None:
    """`got` is LSNs 1.. without a gap, all of the history before the cut at `cut` or all
    of the history after it (written by `new`; records below the cut are in both)."""
    assert [r.lsn for r in got] == list(range(1, len(got) + 1))
    if got and got[-1].data[:1] == b"A":
        assert all(r.data == a(r.lsn) for r in got)
    else:
        assert all(r.data == (a(r.lsn) if r.lsn < cut else new(r.lsn)) for r in got)


@pytest.mark.parametrize("batches", [False, True], ids=["read", "read_batches"])
async def test_a_read_past_a_cut_raises_and_never_goes_on_in_the_new_history(
    log_dir: Path, batches: bool
) -> None:
    """The read holds a chunk of records when the writer cuts below its position and
    writes other records under the removed LSNs (in the same batches at the same offsets,
    under the same salt: they pass every checksum): it may still give the records of the
    chunk it holds (read before the cut), then raises; it never goes on with the records
    written after the cut."""
    async with walasync.open(log_dir, segment_size=ONE_SEGMENT) as wal:
        await fill(wal, a, 8000)
        async with walasync.open(log_dir, readonly=True) as ro:
            it = read(ro, batches, 1)
            got = await take(it, 3000)  # the second chunk (to ~5300, of 1 MiB) is in hand
            await wal.truncate_back(1000)
            await fill(wal, x, 8000)
            with pytest.raises(TruncatedError):
                async for rec in it:
                    got.append(rec)
            one_history(got, 1001)
            assert got[-1].data[:1] == b"A" and len(got) < 8000


@pytest.mark.parametrize("batches", [False, True], ids=["read", "read_batches"])
async def test_a_read_stops_at_a_cut_made_ahead_of_it(log_dir: Path, batches: bool) -> None:
    """A cut ahead of the read: it gives every record before the cut, then raises (as a
    `Wal` reader does), instead of taking the records written after the cut for the ones
    it set out to read."""
    async with walasync.open(log_dir, segment_size=ONE_SEGMENT) as wal:
        await fill(wal, a, 8000)
        async with walasync.open(log_dir, readonly=True) as ro:
            it = read(ro, batches, 1)
            got = await take(it, 3000)
            await wal.truncate_back(7000)
            await fill(wal, x, 8000)
            with pytest.raises(TruncatedError, match="from 7001 on"):
                async for rec in it:
                    got.append(rec)
            one_history(got, 7001)
            assert len(got) == 7000


async def test_a_follower_past_a_cut_raises(log_dir: Path) -> None:
    async with walasync.open(log_dir, segment_size=ONE_SEGMENT) as wal:
        await fill(wal, a, 8000)
        async with walasync.open(log_dir, readonly=True, poll_interval=0.001) as ro:
            it = read(ro, False, 1, follow=True)
            got = await take(it, 3000)
            await wal.truncate_back(2000)
            await fill(wal, x, 9000)
            with pytest.raises(TruncatedError, match="from 2001 on"):
                async with cancel_after(20):
                    async for rec in it:
                        got.append(rec)
            one_history(got, 2001)
            assert got[-1].data[:1] == b"A"


@pytest.mark.parametrize("batches", [False, True], ids=["read", "read_batches"])
async def test_a_follower_before_a_cut_goes_on_in_the_new_history(
    log_dir: Path, batches: bool
) -> None:
    """A cut ahead of a follower removed nothing it gave: it gives the records before the
    cut, then those written after it, as a `Wal` follower does."""
    async with walasync.open(log_dir, segment_size=ONE_SEGMENT) as wal:
        await fill(wal, a, 8000)
        async with walasync.open(log_dir, readonly=True, poll_interval=0.001) as ro:
            it = read(ro, batches, 1, follow=True)
            got = await take(it, 3000)
            await wal.truncate_back(7000)
            await fill(wal, y, 9000)
            async with cancel_after(20):
                async for rec in it:
                    got.append(rec)
                    if rec.lsn == 9000:
                        break
            one_history(got, 7001, y)
            assert got[-1] == Record(9000, y(9000))


class PausedLook(FileIO):
    """Once armed, the next look (`refresh`) stops after it read META, until let go."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.paused = threading.Event()
        self.go = threading.Event()

    def listdir(self, path: str) -> list[str]:
        if self.armed:
            self.armed = False
            self.paused.set()
            self.go.wait(30)
        return super().listdir(path)


async def test_a_cut_another_read_saw_after_the_look_stops_a_read(log_dir: Path) -> None:
    """A read goes up to what its look found. A cut that another read of the same log
    saw after that look read META (the look may have found records the cut removed)
    stops this read too, as if made while it ran."""
    io = PausedLook()
    async with walasync.open(log_dir, segment_size=ONE_SEGMENT) as wal:
        await fill(wal, a, 8000)
        async with walasync.open(log_dir, readonly=True, io=io) as ro:
            other = ro.read(1)
            await take(other, 3000)
            it = ro.read(1)
            io.armed = True
            first = asyncio.ensure_future(it.__anext__())
            await until(io.paused.is_set)  # it read META; not the segment yet
            await wal.truncate_back(1000)
            await fill(wal, x, 1010)
            with pytest.raises(TruncatedError):
                async for _ in other:  # its next chunk: it sees the cut
                    pass
            io.go.set()
            got = [await first]
            with pytest.raises(TruncatedError, match="from 1001 on"):
                async for rec in it:
                    got.append(rec)  # noqa: PERF401 - what came before the error counts
            one_history(got, 1001)


@pytest.mark.parametrize("durable_only", [False, True])
async def test_a_follower_that_missed_two_cuts_raises(log_dir: Path, durable_only: bool) -> None:
    """META keeps the count of cuts and the last one only: after two cuts between two
    looks, the lower one is unknown, so the follower takes it for the lowest possible."""
    async with walasync.open(log_dir, segment_size=64 << 10) as wal:
        await fill(wal, a, 300)
        async with walasync.open(
            log_dir, readonly=True, poll_interval=0.001, durable_only=durable_only
        ) as ro:
            it = ro.read(1, follow=True)
            got = await take(it, 300)
            await wal.truncate_back(100)
            await fill(wal, x, 600)
            await wal.truncate_back(500)  # the last cut, above all it gave
            await fill(wal, a, 510)
            with pytest.raises(TruncatedError):
                async with cancel_after(20):
                    got.append(await it.__anext__())
            assert got == [Record(i, a(i)) for i in range(1, 301)]
            await it.aclose()


class SyncedPaths(FileIO):
    """Records the files fdatasync'd (the reader's own I/O layer: the writer's is apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[int, str] = {}
        self.synced: list[str] = []

    def open_read(self, path: str) -> int:
        fd = super().open_read(path)
        self.names[fd] = Path(path).name
        return fd

    def fdatasync(self, fd: int) -> None:
        self.synced.append(self.names[fd])
        super().fdatasync(fd)


async def test_a_durable_reader_that_missed_two_cuts_syncs_from_the_lowest_possible(
    log_dir: Path,
) -> None:
    """After two cuts between two looks, the records from the lower cut on may have been
    rewritten: a `durable_only` reader syncs every segment they may be in, not only those
    from the last cut on."""
    io = SyncedPaths()
    async with walasync.open(log_dir, segment_size=4096) as wal:
        await fill(wal, a, 60, unit=1)
        async with walasync.open(log_dir, readonly=True, durable_only=True, io=io) as ro:
            assert ro.last_lsn == 60
            await wal.truncate_back(5)  # in the first segment
            await fill(wal, y, 60, unit=1)
            names = [p.name for p in segment_files(log_dir)]
            assert 6 < int(Path(names[-1]).stem) <= 50  # the next cut is in another segment
            await wal.truncate_back(50)  # in a later segment
            io.synced.clear()
            assert await ro.refresh() == 50
            assert names[0] in io.synced
            io.synced.clear()
            assert await ro.refresh() == 50  # and then: nothing new to sync
            assert io.synced == []


async def test_what_a_durable_reader_gave_across_a_cut_survives_a_power_loss() -> None:
    """A cut made while a `durable_only` reader reads: it never gives the records written
    after the cut (not made durable by its look), which a power loss could take back."""
    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    path = "/data/log"
    async with walasync.open(path, io=disk, durability="none", segment_size=4096) as wal:
        await fill(wal, a, 100, unit=1)
        async with walasync.open(path, io=disk, readonly=True, durable_only=True) as ro:
            it = ro.read(1)
            got = await take(it, 5)
            await wal.truncate_back(60)  # syncs what it keeps; the records after it are not
            await fill(wal, x, 63, unit=1)  # in the segment cut: a power loss takes them back
            with pytest.raises(TruncatedError):
                async for rec in it:
                    got.append(rec)
        assert len(got) == 60
        async with walasync.open(path, io=disk.crash()) as after:
            kept = [rec async for rec in after.read(1, len(got))]
        assert got == kept == [Record(i, a(i)) for i in range(1, 61)]


async def test_a_sealed_segment_cut_and_written_again_is_read_right(log_dir: Path) -> None:
    """A reader keeps the indexes of the sealed segments it read. After a cut, the writer
    writes the cut segment on with another layout and seals it again, or makes a new
    segment under the name of one it removed: the reader must not seek through the old
    index (it would report the sound log as corrupt)."""

    def names() -> list[int]:
        return [int(p.stem) for p in segment_files(log_dir)]

    async def one_by_one(make: Callable[[int], bytes], until: Callable[[], bool]) -> None:
        while not until():  # a batch per record: an index entry every 16 KiB
            await wal.append(make(wal.last_lsn + 1))

    async def same(ro: walasync.ReadOnlyWal, lo: int, hi: int) -> None:
        expected = [r async for r in wal.read(lo, hi)]
        assert len(expected) == hi - lo + 1
        assert [r async for r in ro.read(lo, hi)] == expected

    def a1k(i: int) -> bytes:
        return b"A%05d" % i + bytes(994)

    def b300(i: int) -> bytes:
        return b"B%05d" % i + bytes(294)

    async with walasync.open(log_dir, segment_size=128 << 10, durability="none") as wal:
        await one_by_one(a1k, lambda: len(names()) >= 3)
        s1 = names()[1]
        async with walasync.open(log_dir, readonly=True) as ro:
            await same(ro, s1 + 100, s1 + 100)  # the reader indexes s1 (sealed)
            # Cut inside s1; smaller records after it: s1 is sealed again, other offsets.
            await wal.truncate_back(s1 + 20)
            await one_by_one(b300, lambda: len(names()) >= 4)
            await same(ro, s1 + 100, s1 + 110)

            # A segment removed, then made again under its name with other records.
            fresh = names()[2]
            await same(ro, fresh + 300, fresh + 300)  # the reader indexes `fresh` (sealed)
            await wal.truncate_back(fresh - 10)
            await one_by_one(b300, lambda: wal.last_lsn == fresh - 1)  # as they were
            assert names()[-1] == s1
            await wal.append(b"BIG" + bytes(40000))  # cannot fit: a segment at `fresh`
            assert names()[-1] == fresh
            await one_by_one(lambda i: b"D%05d" % i + bytes(94), lambda: names()[-1] > fresh)
            await same(ro, fresh + 300, fresh + 305)


def test_the_cut_since_a_look_is_the_lowest_possible() -> None:
    before = Meta(b"i" * 16, 1, 40, cuts=3, last_cut=70)
    assert before.cut_since(before) == 0
    one = before.with_(cuts=4, last_cut=90)
    assert one.cut_since(before) == 90
    assert one.with_(cut=90).cut_since(before) == 90  # committed, under way
    assert one.with_(first_lsn=95).cut_since(before) == 90
    assert before.with_(cuts=5, last_cut=90).cut_since(before) == 40  # one is unknown
    assert before.with_(cuts=5, first_lsn=60).cut_since(before) == 40
    assert before.with_(cuts=2).cut_since(before) == 1  # not the log it was
    assert before.with_(log_id=b"j" * 16).cut_since(before) == 1


# -- a reader in another process, while the writer cuts, truncates and recycles ------------

READER = r"""
import asyncio, json, random, sys, walasync

def check(rec):
    lsn, gen, size = (int(v) for v in rec.data[:40].split(b"|")[0].split(b":"))
    assert lsn == rec.lsn and rec.data == body(lsn, gen, size), rec
    return gen, size == 0  # size 0: the last record

def body(lsn, gen, size):
    head = b"%d:%d:%d|" % (lsn, gen, size)
    return head + bytes([gen % 251]) * size

async def follow(ro, out):
    start = ro.first_lsn
    while True:
        run = [start, []]
        out.append(run)
        try:
            async for rec in ro.read(start, follow=True):
                gen, last = check(rec)
                run[1].append(gen)
                if last:
                    return
                print("at", rec.lsn, flush=True)
        except walasync.TruncatedError:
            run.append("T")
            print("truncated", flush=True)
            await ro.refresh()
            start = ro.first_lsn

async def seek(ro, out, done):
    rnd = random.Random(7)
    while not done.is_set():
        await ro.refresh()
        lo, hi = ro.first_lsn, ro.last_lsn
        if hi >= lo:
            start = rnd.randint(lo, hi)
            run = [start, []]
            out.append(run)
            try:
                async for rec in ro.read(start, start + rnd.randint(0, 30)):
                    run[1].append(check(rec)[0])
            except walasync.TruncatedError:
                run.append("T")
        await asyncio.sleep(0.001)

async def main():
    followed, sought = [], []
    async with walasync.open(sys.argv[1], readonly=True, poll_interval=0.001) as ro:
        done = asyncio.Event()
        seeker = asyncio.ensure_future(seek(ro, sought, done))
        await follow(ro, followed)
        done.set()
        await seeker
    print("result", json.dumps({"followed": followed, "sought": sought}), flush=True)

if sys.argv[2] == "uvloop":
    import uvloop
    uvloop.new_event_loop().run_until_complete(main())
else:
    asyncio.run(main())
"""


def body(lsn: int, gen: int, size: int) -> bytes:
    return b"%d:%d:%d|" % (lsn, gen, size) + bytes([gen % 251]) * size


class History:
    """What the writer wrote: the generation (cuts made before) of each LSN's record, and
    each cut's first removed LSN, to check what the reader gave."""

    def __init__(self) -> None:
        self.cuts: list[int] = [0]  # cuts[g]: the first LSN the cut that began gen g removed

    def live_in(self, lsn: int, gen: int, later: int) -> bool:
        """Whether the record of generation `gen` at `lsn` was still in the log when
        generation `later` began."""
        return all(self.cuts[g] > lsn for g in range(gen + 1, later + 1))

    def check(self, start: int, gens: list[int], written: set[tuple[int, int]]) -> None:
        """The records a read gave from `start`: each one the writer wrote, and each still
        in the log when the next one given was written (none a cut removed before the
        reader went on past it)."""
        for i, gen in enumerate(gens):
            assert (start + i, gen) in written, (start + i, gen)
        for i, (gen, nxt) in enumerate(itertools.pairwise(gens)):
            assert gen <= nxt, (start + i, gen, nxt)
            assert self.live_in(start + i, gen, nxt), (start + i, gen, nxt, self.cuts)


async def test_a_reader_in_another_process_while_the_writer_cuts_truncates_and_recycles(
    log_dir: Path,
) -> None:
    rnd = random.Random(1)
    history = History()
    written: set[tuple[int, int]] = set()
    at = 0
    truncated = 0

    async with walasync.open(log_dir, segment_size=8192, retention_bytes=40 << 10) as wal:

        async def append(n: int, size: int | None = None) -> None:
            gen = len(history.cuts) - 1
            for _ in range(n):
                lsn = wal.last_lsn + 1
                n = rnd.choice((10, 50, 300, 900)) + gen % 7 if size is None else size
                assert await wal.append(body(lsn, gen, n)) == lsn
                written.add((lsn, gen))

        await append(50)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            READER,
            str(log_dir),
            type(asyncio.get_running_loop()).__module__.split(".")[0],  # the reader's too
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        result: dict[str, list[list[Any]]] = {}
        moved = asyncio.Event()

        async def listen() -> None:
            nonlocal at, truncated
            assert proc.stdout is not None
            try:
                async for line in proc.stdout:
                    word, _, rest = line.decode().strip().partition(" ")
                    if word == "at":
                        at = int(rest)
                        moved.set()
                    elif word == "truncated":
                        truncated += 1
                    elif word == "result":
                        result.update(json.loads(rest))
            finally:
                moved.set()

        listener = asyncio.ensure_future(listen())
        try:
            for step in range(40):
                await append(rnd.randint(5, 40))
                if step % 4 == 0:  # let the follower pass a point, then cut below it
                    target = wal.last_lsn - 10
                    async with cancel_after(60):
                        while at < target and not listener.done():
                            moved.clear()
                            await moved.wait()
                    lsn = rnd.randint(max(wal.first_lsn - 1, target - 60), target - 1)
                else:
                    lsn = rnd.randint(max(wal.first_lsn - 1, wal.last_lsn - 40), wal.last_lsn)
                op = rnd.random()
                if step % 4 == 0 or op < 0.3:
                    await wal.truncate_back(lsn)
                    history.cuts.append(lsn + 1)
                elif op < 0.5:
                    await wal.truncate_front(rnd.randint(wal.first_lsn, wal.last_lsn))
                else:
                    await wal.apply_retention()
            await append(1, size=0)  # the end
            async with cancel_after(60):
                await proc.wait()
                await listener
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
    assert proc.returncode == 0, err
    assert truncated >= 1  # it was cut below a follower at least once: it raised
    for start, gens, *end in [*result["followed"], *result["sought"]]:
        assert isinstance(start, int) and isinstance(gens, list)
        history.check(start, gens, written)
        assert end in ([], ["T"])
    assert sum(len(gens) for _, gens, *_ in result["sought"]) > 0
