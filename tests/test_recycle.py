"""Recycled segments: files that truncation frees become the next spare, and their old
frames are never read as live data."""

from __future__ import annotations

import random
from pathlib import Path

from conftest import loops, run, segment_files, small
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walasync
from walasync import Record
from walasync import _format as fmt

OPTS = small()


def header(path: Path) -> fmt.SegmentHeader:
    return fmt.decode_segment_header(path.read_bytes()[: fmt.SEGMENT_HEADER])


async def test_a_freed_segment_becomes_the_next_one(log_dir: Path) -> None:
    async with walasync.open(log_dir, **OPTS) as wal:
        for i in range(60):
            await wal.append(b"old %d|" % i + bytes(200))
        first = segment_files(log_dir)[0]
        inode, salt = first.stat().st_ino, header(first).salt
        await wal.truncate_front(wal.last_lsn + 1)
        assert (log_dir / "recycle.tmp").stat().st_ino == inode
        for i in range(60):
            await wal.append(b"new %d|" % i + bytes(150))
        reused = [p for p in segment_files(log_dir) if p.stat().st_ino == inode]
        assert len(reused) == 1
        assert header(reused[0]).previous_salt == salt != header(reused[0]).salt
        got = [r async for r in wal.read()]
    assert [r.data[:4] for r in got] == [b"new "] * 60
    async with walasync.open(log_dir, **OPTS) as wal:
        assert [r async for r in wal.read()] == got


async def test_a_torn_tail_in_a_recycled_segment_keeps_the_old_frames(log_dir: Path) -> None:
    """Recovery zeroes the torn batch, not the whole old content after it."""
    async with walasync.open(log_dir, **OPTS) as wal:
        for i in range(60):
            await wal.append(b"old %d|" % i + bytes(300))
        await wal.truncate_front(wal.last_lsn + 1)
        while not any(header(p).previous_salt for p in segment_files(log_dir)):
            await wal.append(b"fill|" + bytes(300))
        lsn = await wal.append(b"x" * 100)
    last = segment_files(log_dir)[-1]
    assert header(last).previous_salt
    data = bytearray(last.read_bytes())
    old_tail = bytes(data[-1024:])  # the old segment's frames, beyond the new data
    end = next(  # the end of the new data: the first frame that is not this segment's
        o
        for o in range(fmt.SEGMENT_HEADER, len(data), 8)
        if (h := fmt.parse_batch_header(bytes(data), o)) is not None and h.first_lsn == lsn
    )
    data[end + 4] ^= 0xFF  # tear the last batch
    last.write_bytes(bytes(data))
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == lsn - 1
        assert await wal.append(b"again") == lsn
        assert [r async for r in wal.read(lsn)] == [Record(lsn, b"again")]
    assert last.read_bytes()[-1024:] == old_tail


@loops
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 4095))
def test_old_frames_never_pass_for_live_ones(
    loop: str, tmp_path: Path, seed: int, cut: int
) -> None:
    """A recycled file full of valid old frames, written over by a few batches and then
    cut at any byte (a crash at any point of a write): recovery finds exactly a prefix of
    the new records, never an old one."""
    rng = random.Random(seed)
    path = tmp_path / f"log-{loop}-{seed}-{cut}"

    async def main() -> None:
        async with walasync.open(path, **OPTS) as wal:
            for i in range(80):
                await wal.append(b"old-%d|" % i + rng.randbytes(rng.randrange(400)))
            await wal.truncate_front(wal.last_lsn + 1)
            new: list[bytes] = []
            while not any(header(p).previous_salt for p in segment_files(path)):
                new.append(b"new-%d|" % len(new) + rng.randbytes(rng.randrange(400)))
                await wal.append(new[-1])
            base = wal.last_lsn - len(new)
            for _ in range(rng.randrange(1, 5)):
                new.append(b"new-%d|" % len(new) + rng.randbytes(rng.randrange(400)))
                await wal.append(new[-1])
        last = segment_files(path)[-1]
        data = bytearray(last.read_bytes())
        at = fmt.SEGMENT_HEADER + cut
        data[at : at + 64] = rng.randbytes(64)  # a torn write somewhere in the file
        last.write_bytes(bytes(data))
        try:
            async with walasync.open(path, **OPTS) as wal:
                got = [r async for r in wal.read()]
        except walasync.CorruptionError:
            return  # damage before a valid batch: reported, not hidden
        assert all(r.data.startswith(b"new-") for r in got)
        assert [r.data for r in got] == new[: len(got)]
        assert [r.lsn for r in got] == list(range(base + 1, base + 1 + len(got)))

    run(loop, main())
