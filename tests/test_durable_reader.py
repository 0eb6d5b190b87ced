"""A read-only opening with `durable_only=True` (the reader `walasync replicate` ships
from): it makes what it reads durable first, so a power loss never takes back a record it
gave out. On `SimulatedDisk`, with a writer in `Durability.NONE` (which leaves its records
unsynced): what the reader saw must be in the log recovered from a crash right after."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cancel_after, segment_files, small

import walasync
from walasync import Batch, FileIO, Record
from walasync.testing import SimulatedDisk

LOG = "/data/log"


def data(i: int) -> bytes:
    return b"r%d|" % i + bytes(i % 50)


async def recovered(disk: SimulatedDisk) -> list[Record]:
    """The records of the log on the disk a power loss leaves now."""
    async with walasync.open(LOG, io=disk.crash()) as wal:
        return [rec async for rec in wal.read()]


async def test_what_it_saw_survives_a_power_loss() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    async with walasync.open(LOG, io=disk, durability="none", **small()) as wal:
        for i in range(1, 301):  # several segments, none synced (NONE mode)
            await wal.append(data(i))
        assert len([p for p in disk.files(LOG) if p.endswith(".wal")]) > 3
        async with walasync.open(LOG, io=disk, readonly=True) as plain:
            assert plain.last_lsn == 300 and not plain.durable_only
        # What a plain reader saw would not all come back: the test is not vacuous.
        with pytest.raises(walasync.CorruptionError):  # records lost before kept ones
            await recovered(disk)
        async with walasync.open(LOG, io=disk, readonly=True, durable_only=True) as ro:
            assert ro.durable_only and ro.log_id == wal.log_id
            seen = [rec async for rec in ro.read()]
            assert [rec.lsn for rec in seen] == list(range(1, 301))
            assert await recovered(disk) == seen
            for i in range(301, 311):
                await wal.append(data(i))
            more = [rec async for rec in ro.read(301)]  # a new look syncs the new ones
            assert [rec.lsn for rec in more] == list(range(301, 311))
            assert await recovered(disk) == seen + more


async def test_records_rewritten_after_a_cut_are_synced_again() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    async with walasync.open(LOG, io=disk, durability="none", **small()) as wal:
        for i in range(1, 101):
            await wal.append(data(i))
        async with walasync.open(LOG, io=disk, readonly=True, durable_only=True) as ro:
            assert ro.last_lsn == 100
            await wal.truncate_back(50)
            for i in range(51, 101):
                await wal.append(b"new %d" % i)  # the same LSNs again, unsynced
            assert await ro.refresh() == 100
            after = await recovered(disk)
            assert [rec.lsn for rec in after] == list(range(1, 101))
            assert after[50:] == [Record(i, b"new %d" % i) for i in range(51, 101)]


class CountingSyncs(FileIO):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def fdatasync(self, fd: int) -> None:
        self.syncs += 1
        super().fdatasync(fd)


async def test_each_look_syncs_only_the_segments_that_grew(log_dir: Path) -> None:
    io = CountingSyncs()
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(1, 201):
            await wal.append(data(i))
        segments = len(segment_files(log_dir))
        async with walasync.open(log_dir, readonly=True, durable_only=True, io=io) as ro:
            assert io.syncs == segments  # the first look: every segment
            await ro.refresh()
            assert io.syncs == segments  # nothing new: nothing synced
            await wal.append(data(201))
            await ro.refresh()
            assert io.syncs == segments + 1  # the last segment only


async def test_read_batches_gives_the_writers_units(log_dir: Path) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(1, 200, 4):
            await wal.append_many([data(j) for j in range(i, i + 3)])
            await wal.append(data(i + 3))
        expected = [batch async for batch in wal.read_batches(5)]
        async with walasync.open(log_dir, readonly=True, durable_only=True) as ro:
            got = [batch async for batch in ro.read_batches(5)]
            assert got == expected and any(batch.joined for batch in got)
            assert [b async for b in ro.read_batches(10, 12)] == [
                Batch(10, [data(10), data(11)], (0,)),
                Batch(12, [data(12)], ()),
            ]
            with pytest.raises(ValueError):
                ro.read_batches(0)


async def test_following_past_records_the_writer_cut_back_is_an_error(log_dir: Path) -> None:
    """A follower must not go on from where it was after the writer removed records it
    gave (and wrote others under their LSNs): for a shipper, that would mix histories."""
    async with walasync.open(log_dir, **small()) as wal:
        for i in range(1, 101):
            await wal.append(data(i))
        async with walasync.open(log_dir, readonly=True, poll_interval=0.001) as ro:
            follower = ro.read_batches(follow=True)
            got = 0
            while got < 100:
                got += len((await follower.__anext__()).records)
            await wal.truncate_back(50)
            for i in range(51, 151):
                await wal.append(b"new %d" % i)
            with pytest.raises(walasync.TruncatedError, match="from 51 on"):
                async with cancel_after(20):
                    async for _ in follower:
                        pass
            # A cut after everything it gave is no loss: it goes on with the new records.
            behind = ro.read(follow=True)
            assert [(await behind.__anext__()).lsn for _ in range(150)] == list(range(1, 151))
            for i in range(151, 161):
                await wal.append(b"gone %d" % i)
            await wal.truncate_back(150)
            await wal.append(b"next")
            assert await behind.__anext__() == Record(151, b"next")
            await behind.aclose()
