"""Recycled segments: files that truncation frees become the next spare, and their old
frames are never read as live data."""

from __future__ import annotations

import logging
import random
import struct
from pathlib import Path

import pytest
from conftest import loops, run, segment_files, small
from hypothesis import HealthCheck, assume, example, given, settings
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


async def test_a_cut_in_a_recycled_segment_zeroes_records_like_old_frames(log_dir: Path) -> None:
    """`truncate_back` in a recycled segment zeroes the batches it removes, up to where the
    old frames begin intact, also past records that hold headers like theirs."""
    async with walasync.open(log_dir, **OPTS) as wal:
        for i in range(60):
            await wal.append(b"old %d|" % i + bytes(200))
        await wal.truncate_front(wal.last_lsn + 1)
        while not header(segment_files(log_dir)[-1]).previous_salt:
            await wal.append(b"fill|" + bytes(100))
        kept = await wal.append(b"kept")
        await wal.append(lookalikes(fmt.BATCH_HEADER + 4, 600))
        gone = random.randbytes(64)
        await wal.append(gone)
        await wal.truncate_back(kept)
        assert gone not in segment_files(log_dir)[-1].read_bytes()
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == kept
        assert [r async for r in wal.read(kept)] == [Record(kept, b"kept")]


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


# -- the end of a recycled segment's data: clean or torn -----------------------------------

SIZES = st.lists(st.integers(0, 900), min_size=1, max_size=6)  # record sizes, cycled
GROUPS = st.lists(st.integers(1, 4), min_size=1, max_size=6)  # records per batch, cycled
# New batches small enough that `extra` of them after the first stay in the recycled file.
NEW_SIZES = st.lists(st.integers(0, 150), min_size=1, max_size=6)
NEW_GROUPS = st.lists(st.integers(1, 3), min_size=1, max_size=6)


class Warnings(logging.Handler):
    """The WARNINGs walasync logs while installed (a sync test cannot use caplog per
    hypothesis example)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        logging.getLogger("walasync").addHandler(self)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("walasync").removeHandler(self)


def records(rng: random.Random, sizes: list[int], groups: list[int], n: int) -> list[list[bytes]]:
    """`n` batches of records of the given sizes and counts (cycled), compressible or not."""
    out, k = [], 0
    for i in range(n):
        batch = []
        for _ in range(groups[i % len(groups)]):
            size = sizes[k % len(sizes)]
            k += 1
            batch.append(bytes(size) if rng.random() < 0.3 else rng.randbytes(size))
        out.append(batch)
    return out


async def recycled_log(
    path: Path,
    rng: random.Random,
    old: tuple[list[int], list[int]],
    new: tuple[list[int], list[int]],
    extra: int,
    **opts: object,
) -> tuple[list[bytes], int]:
    """A log closed cleanly whose last segment is a recycled file: frames of records of
    the `old` (sizes, batch counts) filled it before, then batches of the `new` ones went
    in until it became the last segment, and `extra` more. Returns the new records (from
    the first LSN) and the first LSN."""
    async with walasync.open(path, **OPTS, **opts) as wal:  # type: ignore[call-overload]
        for batch in records(rng, *old, 1000):
            await wal.append_many(batch)
            if len(segment_files(path)) >= 3:
                break
        await wal.truncate_front(wal.last_lsn + 1)
        base = wal.last_lsn + 1
        new_records: list[bytes] = []
        todo = records(rng, *new, 1000)
        while not header(segment_files(path)[-1]).previous_salt:
            new_records += todo[0]
            await wal.append_many(todo.pop(0))
        for batch in todo[:extra]:  # small enough to stay in this segment
            new_records += batch
            await wal.append_many(batch)
    assert header(segment_files(path)[-1]).previous_salt
    return new_records, base


def data_end(path: Path, first: int) -> tuple[int, int]:
    """(offset just past the last valid batch, the LSN the next batch must carry) of the
    segment file at `path` that starts at `first`."""
    data, salt = path.read_bytes(), header(path).salt
    offset, lsn = fmt.SEGMENT_HEADER, first
    while offset + fmt.BATCH_HEADER <= len(data):
        head = fmt.parse_batch_header(data, offset)
        if head is None or head.first_lsn != lsn:
            break
        payload = data[offset + fmt.BATCH_HEADER : offset + fmt.BATCH_HEADER + head.length]
        if not fmt.check_batch(head, payload, salt):
            break
        offset, lsn = offset + head.size, lsn + head.nrecords
    return offset, lsn


def old_frame_at_or_after(data: bytes, start: int, salt: int) -> int:
    """The first 8-aligned offset at or after `start` where a frame of the file's previous
    life (valid under its `salt`) begins intact, or the file's size."""
    for at in range(fmt.padded(start), len(data) - fmt.BATCH_HEADER + 1, 8):
        head = fmt.parse_batch_header(data, at) or fmt.parse_seal_header(data, at)
        if head is not None:
            payload = data[at + fmt.BATCH_HEADER : at + fmt.BATCH_HEADER + head.length]
            if len(payload) == head.length and fmt.check_batch(head, payload, salt):
                return at
    return len(data)


def lookalikes(offset: int, size: int) -> bytes:
    """`size` bytes that, put at `offset` of a frame, hold at each 8-aligned offset the
    header of a frame with LSN 1, as a segment's old frames have (valid in no segment)."""
    fake = struct.pack("<IIIIQ", fmt.BATCH_MAGIC, 0, 8, 1, 1)
    return (bytes(-offset % 8) + fake * (size // len(fake) + 1))[:size]


def segment_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in segment_files(path)}


async def read_all(path: Path) -> list[bytes]:
    async with walasync.open(path, **OPTS) as wal:
        return [r.data async for r in wal.read()]


@loops
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@example(  # the audit's case (old and new frames of different sizes)
    seed=0, old=([100], [1]), new=([57], [1]), extra=4, mode="fsync"
)
@example(  # frames of one size: the data ends right where an old frame begins
    seed=0, old=([100], [1]), new=([100], [1]), extra=3, mode="fsync"
)
@given(
    seed=st.integers(0, 2**32 - 1),
    old=st.tuples(SIZES, GROUPS),
    new=st.tuples(NEW_SIZES, NEW_GROUPS),
    extra=st.integers(0, 6),
    mode=st.sampled_from(["fsync", "interval", "zstd"]),
)
def test_a_clean_close_on_a_recycled_segment_leaves_no_torn_tail(
    loop: str,
    tmp_path: Path,
    seed: int,
    old: tuple[list[int], list[int]],
    new: tuple[list[int], list[int]],
    extra: int,
    mode: str,
) -> None:
    """Whatever the sizes of the old frames and the new ones, the old frames after the data
    of a cleanly closed log (the rest of the one the data ends in, then whole ones) are not
    a torn write: describe and verify see none, and open warns of none and writes nothing."""
    path = tmp_path / f"log-{loop}-{seed}-{len(list(tmp_path.iterdir()))}"
    opts: dict[str, object] = {"compression": "zstd"} if mode == "zstd" else {"durability": mode}

    new_records, _ = run(loop, recycled_log(path, random.Random(seed), old, new, extra, **opts))
    before = segment_bytes(path)
    info = walasync.describe(path)
    assert info.torn_tail == 0 and not info.problems
    report = walasync.verify(path)
    assert not [n for n in report.notes if "torn" in n], report.notes
    # (verify takes any compressed batch for damage: a bug of its own, not of recycling)
    assert report.ok, report.problem
    with Warnings() as warned:
        assert run(loop, read_all(path)) == new_records
    assert warned == []
    assert segment_bytes(path) == before


@loops
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@example(  # the torn write ends 1 byte into an old frame, writing its first byte as it was
    seed=32793,
    old=([639, 102, 852], [2, 2, 4, 3]),
    new=([68, 22, 123], [2, 2, 3, 1, 2]),
    extra=3,
    torn=[175],
    cut=0.18883216549125528,
    damage="torn",
    fakes=True,
)
@given(
    seed=st.integers(0, 2**32 - 1),
    old=st.tuples(SIZES, GROUPS),
    new=st.tuples(NEW_SIZES, NEW_GROUPS),
    extra=st.integers(0, 6),
    torn=st.lists(st.integers(1, 200), min_size=1, max_size=2),
    cut=st.floats(0, 1, exclude_max=True),
    damage=st.sampled_from(["torn", "torn, then the next batch", "only the next batch"]),
    fakes=st.booleans(),
)
def test_a_torn_write_over_old_frames_is_cut(
    loop: str,
    tmp_path: Path,
    seed: int,
    old: tuple[list[int], list[int]],
    new: tuple[list[int], list[int]],
    extra: int,
    torn: list[int],
    cut: float,
    damage: str,
    fakes: bool,
) -> None:
    """A batch torn where a recycled segment's data ends (any prefix of it that holds its
    header, over the old frames) is found and zeroed, with the rest of the old frame it
    ends in, and no more, even if its records look like old frames (`fakes`); every record
    before it is kept. A valid batch after it, or after the data with no torn batch before
    it, means records are missing: open raises."""
    path = tmp_path / f"log-{loop}-{seed}-{len(list(tmp_path.iterdir()))}"
    rng = random.Random(seed)
    new_records, _ = run(loop, recycled_log(path, rng, old, new, extra))
    last = segment_files(path)[-1]
    end, lsn = data_end(last, header(last).first_lsn)
    salt, previous = header(last).salt, header(last).previous_salt
    clean = last.read_bytes()
    data = [rng.randbytes(n) for n in torn]
    if fakes:  # the first record: headers of old frames, each at an 8-aligned offset
        data[0] = lookalikes(fmt.BATCH_HEADER + 4 * len(torn), torn[0])
    head, payload = fmt.encode_batch(lsn, data, salt)
    frame = head + payload
    k = len(head) + int(cut * (len(payload.rstrip(b"\0")) - 1))  # its header, not all
    image = bytearray(clean)
    if damage != "only the next batch":
        image[end : end + k] = frame[:k]
    if damage != "torn":  # the next batch, whole, after the torn one or the data
        at = fmt.padded(end + k) if damage == "torn, then the next batch" else end + 8
        after = b"".join(fmt.encode_batch(lsn + len(torn), [b"next"], salt))
        image[at : at + len(after)] = after
    assert len(image) == len(clean)
    # Neither the old bytes nor the next batch's (it begins where the torn write ends)
    # complete the torn batch: not all of it up to its last non-zero byte is there.
    whole = len(head) + len(payload.rstrip(b"\0"))
    assume(image[end : end + whole] != frame[:whole])
    last.write_bytes(bytes(image))
    if damage != "torn":
        assert walasync.describe(path).problems
        assert not walasync.verify(path).ok
        assert walasync.repair(path, dry_run=True).bytes_cut >= at + len(after) - end
        with pytest.raises(walasync.CorruptionError):
            run(loop, read_all(path))
        return
    # Where old frames go on intact, in the bytes on disk: the torn write's last bytes may
    # be those it wrote over (a lookalike header's magic over an old frame's), and then the
    # old frame they begin is whole, and the torn write ends before it.
    stop = old_frame_at_or_after(bytes(image), end + 1, previous)
    info = walasync.describe(path)
    assert info.torn_tail == len(bytes(image[:stop]).rstrip(b"\0")) - end > 0
    assert [n for n in walasync.verify(path).notes if "torn" in n]
    with Warnings() as warned:
        assert run(loop, read_all(path)) == new_records
    assert [m for m in warned if "cut a torn tail" in m]
    assert last.read_bytes() == image[:end] + bytes(stop - end) + image[stop:]
