"""Recovery and corruption detection, on real files: round trips through close and reopen,
torn tails (truncated, half-written or garbage-filled last segments), damaged sealed and
last segments, missing segments, and the files a log directory may hold besides segments.

The property tests are sync functions that run their own event loop (asyncio and uvloop,
by parametrization) in a fresh temporary directory per example: async `@given` tests do not
mix well with pytest-asyncio's function-scoped loops and fixtures."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import loops, run, small
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walasync
from walasync import CorruptionError, Record, UnsupportedFormatError
from walasync import _format as fmt
from walasync import _segment as seg

SEGMENT = 4096
OPTS: dict[str, Any] = small()
HEADER = fmt.SEGMENT_HEADER


PROPERTY = settings(
    max_examples=30,
    deadline=None,
    # The guard against blocking calls on the loop is function-scoped and autouse; it is
    # meant to stay active across all examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- records and workloads ------------------------------------------------------------------


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def datas(n: int, size: int = 100, seed: int = 0) -> list[bytes]:
    """`n` distinct records of `size` random bytes plus a short prefix. Their frames all
    have the same size (for fewer than 1000 records), so layouts are predictable: with
    segment_size=4096, 29 frames of size=100 fit in a segment, 17 of 200, 9 of 400."""
    rng = random.Random(seed)
    return [b"%d:" % i + rng.randbytes(size) for i in range(n)]


RECORD = st.builds(
    blob,
    st.integers(0, 40)
    | st.integers(0, 600)
    | st.integers(SEGMENT - 70, SEGMENT + 40)  # about one segment, or more
    | st.just(0),
    st.integers(0, 2**32),
)
Item = bytes | list[bytes]  # one `append`, or one `append_many`
ITEM = RECORD | st.lists(RECORD, max_size=5)
MAX_TOTAL = 3 * SEGMENT


def _cap(groups: list[list[Item]]) -> list[list[Item]]:
    """Keep the log at about three segments at most."""
    out: list[list[Item]] = []
    total = 0
    for group in groups:
        kept: list[Item] = []
        for item in group:
            total += len(item) if isinstance(item, bytes) else sum(map(len, item))
            if total > MAX_TOTAL:
                break
            kept.append(item)
        if kept:
            out.append(kept)
        if total > MAX_TOTAL:
            break
    return out


# Groups of items appended concurrently (gather), the groups one after another.
WORKLOAD = st.lists(st.lists(ITEM, min_size=1, max_size=6), min_size=1, max_size=8).map(_cap)


async def _append_item(wal: walasync.Wal, item: Item) -> tuple[range, list[bytes]]:
    if isinstance(item, bytes):
        lsn = await wal.append(item)
        return range(lsn, lsn + 1), [item]
    lsns = await wal.append_many(item)
    assert len(lsns) == len(item)
    return lsns, item


async def append_groups(wal: walasync.Wal, groups: list[list[Item]]) -> dict[int, bytes]:
    """Append every group concurrently, one group after another; LSN -> record."""
    written: dict[int, bytes] = {}
    for group in groups:
        for lsns, items in await asyncio.gather(*(_append_item(wal, i) for i in group)):
            for lsn, data in zip(lsns, items, strict=True):
                assert lsn not in written
                written[lsn] = data
    return written


async def append_each(wal: walasync.Wal, records: list[bytes]) -> list[int]:
    """Append one record at a time: one batch each."""
    return [await wal.append(r) for r in records]


async def read_all(
    wal: walasync.Wal, start: int | None = None, end: int | None = None
) -> list[Record]:
    return [r async for r in wal.read(start, end)]


async def read_until_error(wal: walasync.Wal) -> tuple[list[Record], CorruptionError | None]:
    """Every record read before a CorruptionError, and the error (or None)."""
    got: list[Record] = []
    try:
        async for record in wal.read():
            got.append(record)  # noqa: PERF401 - keep what came before the error
    except CorruptionError as exc:
        return got, exc
    return got, None


def as_records(records: list[bytes], first: int = 1) -> list[Record]:
    return [Record(lsn, data) for lsn, data in enumerate(records, first)]


async def reopen_records(path: Path) -> tuple[list[Record], int]:
    async with walasync.open(path, **OPTS) as wal:
        assert wal.first_lsn == 1
        return await read_all(wal), wal.last_lsn


async def open_fails(path: Path, error: type[CorruptionError] = CorruptionError) -> Any:
    """The error opening the log raises; fails the test if it opens."""
    try:
        wal = await walasync.open(path, **OPTS)
    except error as exc:
        return exc
    await wal.close()
    pytest.fail(f"opening {path} did not raise {error.__name__}")


async def write_log(path: Path, records: list[bytes]) -> None:
    async with walasync.open(path, **OPTS) as wal:
        assert await append_each(wal, records) == list(range(1, len(records) + 1))


# -- reading the files directly ------------------------------------------------------------


class Frame(NamedTuple):
    offset: int
    length: int  # unpadded payload
    size: int  # whole padded frame
    first_lsn: int
    nrecords: int

    @property
    def covered_end(self) -> int:
        """End of the bytes the checksum covers (the padding follows)."""
        return self.offset + fmt.BATCH_HEADER + self.length

    @property
    def end(self) -> int:
        return self.offset + self.size


def salt_of(segment: Path | bytes) -> int:
    """The salt in a segment's header (which must be intact)."""
    data = segment if isinstance(segment, bytes) else segment.read_bytes()[:HEADER]
    return fmt.decode_segment_header(data[:HEADER]).salt


def frames(data: bytes, first_lsn: int) -> list[Frame]:
    """The valid batches of a segment's bytes (header intact), in order, as a reader sees
    them."""
    out: list[Frame] = []
    salt = salt_of(data)
    pos, lsn = HEADER, first_lsn
    while pos + fmt.BATCH_HEADER <= len(data):
        head = fmt.parse_batch_header(data, pos)
        if head is None or head.first_lsn != lsn:
            break
        payload = data[pos + fmt.BATCH_HEADER : pos + fmt.BATCH_HEADER + head.length]
        if len(payload) != head.length or not fmt.check_batch(head, payload, salt):
            break
        out.append(Frame(pos, head.length, head.size, lsn, head.nrecords))
        pos += head.size
        lsn += head.nrecords
    return out


def segment_files(path: Path) -> list[Path]:
    """The segment files of a log directory, oldest first (exactly the names walasync
    writes, unlike a glob, so foreign files do not count)."""
    return sorted(p for p in path.iterdir() if re.fullmatch(r"[0-9]{20}\.wal", p.name))


def first_lsn_of(segment: Path) -> int:
    return int(segment.name.removesuffix(".wal"))


def data_end(segment: Path) -> tuple[int, int]:
    """(offset just past the last valid batch, LSN the next batch would carry)."""
    fs = frames(segment.read_bytes(), first_lsn_of(segment))
    if not fs:
        return HEADER, first_lsn_of(segment)
    return fs[-1].end, fs[-1].first_lsn + fs[-1].nrecords


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def resalt(segment: Path, victim: Frame, salt: int) -> None:
    """Rewrite a batch in place with the same LSN and records, checksummed with `salt`:
    what a batch of another segment (or a frame carried as data) looks like here."""
    raw = segment.read_bytes()[victim.offset : victim.end]
    head = fmt.parse_batch_header(raw)
    assert head is not None
    records = fmt.decode_records(head, raw[fmt.BATCH_HEADER : fmt.BATCH_HEADER + head.length])
    frame = b"".join(fmt.encode_batch(victim.first_lsn, records, salt))
    assert len(frame) == victim.size
    assert frame[8:] == raw[8:]  # only the checksum differs
    write_at(segment, victim.offset, frame)


def seal_end(segment: Path, end: int) -> int:
    """`end`, or the end of the valid seal frame at `end` if the segment has one there."""
    data = segment.read_bytes()
    head = fmt.parse_seal_header(data, end) if end + fmt.BATCH_HEADER <= len(data) else None
    if head is None:
        return end
    payload = data[end + fmt.BATCH_HEADER : end + head.size]
    assert fmt.check_batch(head, payload, salt_of(data)), f"damaged seal at {end}"
    return end + head.size


def seal(segment: Path) -> None:
    """Seal a segment as rotation does (its index, the file cut after it), for tests that
    build the state a writer leaves between sealing a segment and writing the next one."""
    data = segment.read_bytes()
    end, next_lsn = data_end(segment)
    index = seg.Index()
    for f in frames(data, first_lsn_of(segment)):
        index.add(f.first_lsn, f.offset)
    frame = fmt.encode_seal(next_lsn, index.lsns, index.offsets, salt_of(data))
    segment.write_bytes(data[:end] + frame)


def check_zero_tail(segment: Path, end: int) -> None:
    """Everything from `end` on (or from the end of a seal there) is zeros (a repaired
    tail)."""
    end = seal_end(segment, end)
    tail = segment.read_bytes()[end:]
    assert tail.count(0) == len(tail), f"non-zero byte at {end + len(tail.rstrip(bytes(1)))}"


# -- round trip -----------------------------------------------------------------------------


@loops
@PROPERTY
@given(WORKLOAD)
def test_round_trip_through_close_and_reopen(loop: str, groups: list[list[Item]]) -> None:
    async def main(path: Path) -> None:
        async with walasync.open(path, **OPTS) as wal:
            written = await append_groups(wal, groups)
            n = len(written)
            assert sorted(written) == list(range(1, n + 1))
            assert wal.last_lsn == n
        expected = [Record(lsn, written[lsn]) for lsn in range(1, n + 1)]

        async with walasync.open(path, **OPTS) as wal:
            assert (wal.first_lsn, wal.last_lsn) == (1, n)
            assert await read_all(wal) == expected
            assert await wal.append(b"after reopen") == n + 1

        async with walasync.open(path, **OPTS) as wal:
            assert await read_all(wal) == [*expected, Record(n + 1, b"after reopen")]

        # Each segment is named after its first LSN, and they chain without gaps.
        lsn = 1
        for segment in segment_files(path):
            assert fmt.decode_segment_header(segment.read_bytes()[:HEADER]).first_lsn == lsn
            assert first_lsn_of(segment) == lsn
            _, lsn = data_end(segment)
        assert lsn == n + 2

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(Path(tmp) / "log"))


@loops
@settings(PROPERTY, max_examples=20)
@given(WORKLOAD, st.lists(st.tuples(st.integers(1, 80), st.integers(-1, 80)), max_size=8))
def test_any_read_range_after_reopen(
    loop: str, groups: list[list[Item]], ranges: list[tuple[int, int]]
) -> None:
    async def main(path: Path) -> None:
        async with walasync.open(path, **OPTS) as wal:
            written = await append_groups(wal, groups)
        expected = [Record(lsn, written[lsn]) for lsn in range(1, len(written) + 1)]
        async with walasync.open(path, **OPTS) as wal:
            for start, length in ranges:
                end = start + length
                assert await read_all(wal, start, end) == expected[start - 1 : end], (start, end)

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(Path(tmp) / "log"))


async def test_round_trip_of_edge_sized_records(log_dir: Path) -> None:
    fit = SEGMENT - HEADER - fmt.BATCH_HEADER - 4  # one record that fills a segment exactly
    records = [b"", b"", b"x", bytes(fit), b"", b"y" * (fit + 1), b"z" * 3 * SEGMENT, b""]
    async with walasync.open(log_dir, **OPTS) as wal:
        assert await append_each(wal, records) == list(range(1, len(records) + 1))
        assert await wal.append_many([b"", b"", b""]) == range(9, 12)
    records += [b"", b"", b""]
    assert await reopen_records(log_dir) == (as_records(records), len(records))


async def test_read_ranges_that_start_or_end_inside_a_batch(log_dir: Path) -> None:
    """Every [start, end] of a log whose batches hold several records each (one frame
    list per read chunk): exactly those records, none past `end`."""
    units = [[b"a"], [b"b", b"c", b"d", b"e", b"f"], [b"g", b"h"], [b"i"], [b"j", b"k", b"l"]]
    async with walasync.open(log_dir, **OPTS) as wal:
        for unit in units:
            await wal.append_many(unit)
    records = [r for unit in units for r in unit]
    n = len(records)
    async with walasync.open(log_dir, **OPTS) as wal:
        for start in range(1, n + 2):
            for end in range(start - 1, n + 2):
                got = await read_all(wal, start, end)
                assert got == as_records(records, 1)[start - 1 : end], (start, end)


async def test_read_sees_no_record_appended_after_it_began(log_dir: Path) -> None:
    """`read()` ends at `last_lsn` as of the call, even when later batches are already in
    the file by the time it reads that far."""
    async with walasync.open(log_dir, **OPTS) as wal:
        await wal.append_many([b"1", b"2"])
        reader = wal.read()  # up to LSN 2
        await wal.append(b"3")
        await wal.append_many([b"4", b"5", b"6"])
        assert [r async for r in reader] == as_records([b"1", b"2"])


# -- torn tails: truncation, garbage, zeros --------------------------------------------------


@loops
@PROPERTY
@given(WORKLOAD, st.data())
def test_truncated_last_segment_recovers_a_prefix(
    loop: str, groups: list[list[Item]], data: st.DataObject
) -> None:
    async def main(path: Path) -> None:
        async with walasync.open(path, **OPTS) as wal:
            written = await append_groups(wal, groups)
        records = [written[lsn] for lsn in range(1, len(written) + 1)]

        last = segment_files(path)[-1]
        before = last.read_bytes()
        fs = frames(before, first_lsn_of(last))
        end = fs[-1].end if fs else HEADER
        cut = data.draw(st.integers(HEADER, end + 8) | st.integers(HEADER, len(before)), "cut")
        os.truncate(last, cut)
        # The batches wholly inside the cut survive (their padding need not).
        kept = [f for f in fs if f.covered_end <= cut]
        k = first_lsn_of(last) - 1 + sum(f.nrecords for f in kept)
        valid_end = kept[-1].end if kept else HEADER

        async with walasync.open(path, **OPTS) as wal:
            assert wal.last_lsn == k
            assert await read_all(wal) == as_records(records[:k])
            new = [b"new 1", b"", b"new 3" * 300]
            assert await append_each(wal, new[:1]) == [k + 1]
            assert await wal.append_many(new[1:]) == range(k + 2, k + 4)
        kept_bytes = min(valid_end, cut)  # the padding of the last batch may be cut off
        assert last.read_bytes()[:kept_bytes] == before[:kept_bytes]  # kept data untouched

        got, last_lsn = await reopen_records(path)
        assert got == as_records(records[:k] + new)
        assert last_lsn == k + 3

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(Path(tmp) / "log"))


@pytest.mark.parametrize("rotate", [False, True])
async def test_cut_in_the_padding_of_the_last_batch_keeps_it(log_dir: Path, rotate: bool) -> None:
    """The padding is not part of a batch's checksum: losing it loses nothing."""
    records = [*datas(3), b"odd" * 7 if not rotate else b"big" * 1400]
    await write_log(log_dir, records)
    last = segment_files(log_dir)[-1]
    victim = frames(last.read_bytes(), first_lsn_of(last))[-1]
    assert victim.covered_end < victim.end
    os.truncate(last, victim.covered_end)
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 4
        assert await append_each(wal, [b"next", b"x" * 3000]) == [5, 6]
    assert await reopen_records(log_dir) == (as_records([*records, b"next", b"x" * 3000]), 6)


async def test_truncated_torn_bytes_are_zeroed_at_open(log_dir: Path) -> None:
    records = datas(6)
    await write_log(log_dir, records)
    (last,) = segment_files(log_dir)
    before = last.read_bytes()
    fs = frames(before, 1)
    cut = fs[4].offset + fmt.BATCH_HEADER + 3  # inside the fifth batch's payload
    os.truncate(last, cut)
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 4
        assert last.read_bytes() == before[: fs[4].offset] + bytes(cut - fs[4].offset)
        assert await read_all(wal) == as_records(records[:4])
        assert await wal.append(b"fifth again") == 5
    assert await reopen_records(log_dir) == (as_records([*records[:4], b"fifth again"]), 5)


@pytest.mark.parametrize("cut", [0, 1, 8, 24, HEADER - 1])
@pytest.mark.parametrize("nsegments", [1, 3])
async def test_last_segment_cut_inside_its_header_is_corruption(
    log_dir: Path, cut: int, nsegments: int
) -> None:
    await write_log(log_dir, datas(9 * (nsegments - 1) + 3, size=400))
    segments = segment_files(log_dir)
    assert len(segments) == nsegments
    os.truncate(segments[-1], cut)
    exc = await open_fails(log_dir)
    assert exc.path == str(segments[-1])
    assert exc.offset == 0


@loops
@PROPERTY
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=12),
    st.integers(0, 64),
    st.binary(min_size=1, max_size=600),
    st.booleans(),
)
def test_garbage_after_the_valid_end_is_a_torn_tail(
    loop: str, records: list[bytes], gap: int, garbage: bytes, past_eof: bool
) -> None:
    async def main(path: Path) -> None:
        await write_log(path, records)
        last = segment_files(path)[-1]
        end, _ = data_end(last)
        at = (last.stat().st_size if past_eof else end) + gap
        write_at(last, at, garbage)
        size = last.stat().st_size

        async with walasync.open(path, **OPTS) as wal:
            assert wal.last_lsn == len(records)
            check_zero_tail(last, end)
            assert last.stat().st_size == size
            assert await read_all(wal) == as_records(records)
            assert await wal.append(b"after") == len(records) + 1
        assert await reopen_records(path) == (as_records([*records, b"after"]), len(records) + 1)

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(Path(tmp) / "log"))


@pytest.mark.parametrize("extra", [1, 7, 24, SEGMENT, 3 * SEGMENT + 5])
async def test_zeros_after_the_end_of_the_file_are_a_torn_tail(log_dir: Path, extra: int) -> None:
    records = datas(30, size=300)
    await write_log(log_dir, records)
    last = segment_files(log_dir)[-1]
    os.truncate(last, last.stat().st_size + extra)
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 30
        assert await read_all(wal) == as_records(records)
        await append_each(wal, datas(20, seed=1))
    got, _ = await reopen_records(log_dir)
    assert got == as_records(records + datas(20, seed=1))


@loops
@PROPERTY
@given(
    st.lists(st.binary(max_size=200), min_size=1, max_size=8),
    st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    st.data(),
)
def test_half_written_batch_after_a_crash_is_a_torn_tail(
    loop: str, records: list[bytes], lost: list[bytes], data: st.DataObject
) -> None:
    """A crash during a batch write leaves any part of that batch on disk (pages reach the
    disk in any order), and zeros elsewhere in the preallocated segment."""

    async def main(path: Path) -> None:
        await write_log(path, records)
        last = segment_files(path)[-1]
        end, next_lsn = data_end(last)
        head, body = fmt.encode_batch(next_lsn, lost, salt_of(last))
        frame = head + body
        covered = fmt.BATCH_HEADER + 4 * len(lost) + sum(map(len, lost))
        a = data.draw(st.integers(0, covered - 1) | st.just(0), label="from")
        b = data.draw(st.integers(a + 1, len(frame)), label="to")
        write_at(last, end + a, frame[a:b])
        # Not torn if what is on disk is the whole batch anyway: the bytes not written may
        # be zeros in the batch too (an empty record's length, high bytes of the LSN).
        whole = last.read_bytes()[end : end + covered] == frame[:covered]
        assert whole or not (a == 0 and b >= covered)
        expected = records + lost if whole else records

        async with walasync.open(path, **OPTS) as wal:
            assert wal.last_lsn == len(expected)
            if not whole:
                check_zero_tail(last, end)
            assert await read_all(wal) == as_records(expected)
            assert await wal.append(b"after") == len(expected) + 1
        got, _ = await reopen_records(path)
        assert got == as_records([*expected, b"after"])

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(Path(tmp) / "log"))


async def test_torn_prefix_of_a_batch_is_zeroed_at_open(log_dir: Path) -> None:
    records = datas(5)
    await write_log(log_dir, records)
    (last,) = segment_files(log_dir)
    end, next_lsn = data_end(last)
    head, body = fmt.encode_batch(next_lsn, [b"lost" * 50, b"also lost"], salt_of(last))
    for size in (1, 4, fmt.BATCH_HEADER - 1, fmt.BATCH_HEADER, fmt.BATCH_HEADER + 100):
        write_at(last, end, (head + body)[:size])
        async with walasync.open(log_dir, **OPTS) as wal:
            assert wal.last_lsn == 5
            check_zero_tail(last, end)
            assert await read_all(wal) == as_records(records)
    async with walasync.open(log_dir, **OPTS) as wal:
        assert await wal.append(b"next") == 6
    assert await reopen_records(log_dir) == (as_records([*records, b"next"]), 6)


# The salt of the leader whose frames the replica of `frame_holding_record` logs: another
# log's salt, which a user does not choose (random, like walasync's own), or none at all (0).
LEADER_SALTS = {"another log": random.Random(2024).getrandbits(32), "no salt": 0}


def frame_holding_record(lsn: int, leader_salt: int) -> bytes:
    """A record that holds a whole walasync frame for `lsn` (say, a replica logging the
    batches its leader ships, encoded with the leader's segment salt), placed 8-aligned in
    the file if its batch starts 8-aligned."""
    inner = b"".join(fmt.encode_batch(lsn, [b"shipped from the leader"], leader_salt))
    # A one-record batch's data starts 28 bytes in: 4 more bytes align the inner frame.
    return b"hdr:" + inner + b"trailer" * 100


def carried_frame(record: bytes) -> tuple[bytes, int]:
    """The frame a `frame_holding_record` carries, and its offset in the record."""
    return record[4 : len(record) - 700], 4


@pytest.mark.parametrize("leader", list(LEADER_SALTS))
async def test_cut_inside_a_record_that_holds_a_frame_recovers_a_prefix(
    log_dir: Path, leader: str
) -> None:
    """The truncation property, for a record whose bytes happen to hold a frame: recovery
    must not take the frame inside the cut-off batch for an acknowledged batch beyond it."""
    records = [*datas(3), frame_holding_record(5, LEADER_SALTS[leader])]
    await write_log(log_dir, records)
    (last,) = segment_files(log_dir)
    assert salt_of(last) != LEADER_SALTS[leader]  # 2**-32 odds of failing by chance
    victim = frames(last.read_bytes(), 1)[3]
    # The carried frame lies 8-aligned in the file, with the LSN the next batch would have.
    inner, skip = carried_frame(records[3])
    at = victim.offset + fmt.BATCH_HEADER + 4 + skip
    assert at % 8 == 0
    assert last.read_bytes()[at : at + len(inner)] == inner
    assert at + len(inner) < victim.covered_end - 1
    os.truncate(last, victim.covered_end - 1)  # the last acknowledged batch is torn

    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 3
        check_zero_tail(last, victim.offset)
        assert await read_all(wal) == as_records(records[:3])
        assert await wal.append(b"fourth again") == 4
    assert await reopen_records(log_dir) == (as_records([*records[:3], b"fourth again"]), 4)


async def test_record_that_holds_a_frame_round_trips(log_dir: Path) -> None:
    """Records that carry frames (of another log, of no log, even this log's bytes) are just
    data: they come back as written, through close and reopen."""
    await write_log(log_dir, datas(2))
    (last,) = segment_files(log_dir)
    own = last.read_bytes()[HEADER : data_end(last)[0]]  # this segment's own two batches
    records = [
        *datas(2),
        frame_holding_record(4, LEADER_SALTS["another log"]),
        frame_holding_record(5, LEADER_SALTS["no salt"]),
        b"copy:" + own,
    ]
    async with walasync.open(log_dir, **OPTS) as wal:
        assert await append_each(wal, records[2:]) == [3, 4, 5]
    assert await reopen_records(log_dir) == (as_records(records), 5)


@pytest.mark.parametrize("leader", list(LEADER_SALTS))
async def test_crash_losing_the_page_with_a_batch_header_is_a_torn_tail(
    log_dir: Path, leader: str
) -> None:
    """A crash during the fdatasync of a batch that spans pages may persist a later page
    and not the first. Here the batch went into a fresh segment (offset 32), the page with
    its header was lost, and the next page holds part of its one record: a frame."""
    records = datas(3)
    await write_log(log_dir, records)
    (first,) = segment_files(log_dir)
    next_lsn = 4
    filler = SEGMENT - HEADER - fmt.BATCH_HEADER - 4  # the record's bytes in the first page
    inner = frame_holding_record(next_lsn + 1, LEADER_SALTS[leader])
    record = b"x" * (filler - 4) + inner
    salt = random.getrandbits(32)  # the new segment's, as rotation picks it
    assert salt != LEADER_SALTS[leader]  # 2**-32 odds of failing by chance
    frame = b"".join(fmt.encode_batch(next_lsn, [record], salt))
    assert data_end(first)[0] + len(frame) > SEGMENT  # so walasync rotates first
    # The carried frame lies 8-aligned in the page that reached the disk.
    carried, skip = carried_frame(inner)
    at = HEADER + fmt.BATCH_HEADER + 4 + filler - 4 + skip
    assert at % 8 == 0
    assert at >= SEGMENT
    assert frame[at - HEADER : at - HEADER + len(carried)] == carried
    # The new segment as rotation installs it: header durable, zeros, the first segment
    # sealed; then the crash.
    seal(first)
    new = first.with_name(f"{next_lsn:020d}.wal")
    new.write_bytes(fmt.encode_segment_header(next_lsn, salt) + bytes(SEGMENT - HEADER))
    write_at(new, SEGMENT, frame[SEGMENT - HEADER :])  # all but the first page

    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 3
        check_zero_tail(new, HEADER)
        assert await read_all(wal) == as_records(records)
        assert await wal.append(b"again") == 4
    assert await reopen_records(log_dir) == (as_records([*records, b"again"]), 4)


# -- damaged segments ------------------------------------------------------------------------


async def test_damaged_batch_in_a_sealed_segment_is_found_by_read(log_dir: Path) -> None:
    records = datas(60, size=200)
    await write_log(log_dir, records)
    segments = segment_files(log_dir)
    assert len(segments) >= 3
    sealed = segments[1]
    fs = frames(sealed.read_bytes(), first_lsn_of(sealed))
    assert len(fs) >= 3
    victim = fs[1]
    at = victim.offset + fmt.BATCH_HEADER + 6  # in the payload
    flip(sealed, at)

    async with walasync.open(log_dir, **OPTS) as wal:  # sealed segments are not scanned
        assert wal.last_lsn == 60
        got, exc = await read_until_error(wal)
        assert exc is not None
        assert exc.path == str(sealed)
        assert exc.offset == victim.offset <= at
        assert str(sealed) in str(exc)
        assert got == as_records(records[: victim.first_lsn - 1])
        # Reading from past the damage works.
        after = victim.first_lsn + victim.nrecords
        assert await read_all(wal, after) == as_records(records[after - 1 :], after)


@pytest.mark.parametrize("where", ["magic", "crc", "length", "count", "lsn", "table", "data"])
async def test_each_field_of_a_sealed_batch_is_checked(log_dir: Path, where: str) -> None:
    records = datas(40, size=200)
    await write_log(log_dir, records)
    sealed = segment_files(log_dir)[0]
    victim = frames(sealed.read_bytes(), 1)[2]
    field = {"magic": 0, "crc": 4, "length": 8, "count": 12, "lsn": 16, "table": 24, "data": 29}
    at = victim.offset + field[where]
    flip(sealed, at, 0x10)
    async with walasync.open(log_dir, **OPTS) as wal:
        got, exc = await read_until_error(wal)
    assert exc is not None
    assert (exc.path, exc.offset) == (str(sealed), victim.offset)
    assert got == as_records(records[: victim.first_lsn - 1])


async def test_sealed_segment_missing_its_last_batch_is_a_gap(log_dir: Path) -> None:
    records = datas(40, size=200)
    await write_log(log_dir, records)
    sealed = segment_files(log_dir)[0]
    victim = frames(sealed.read_bytes(), 1)[-1]
    write_at(sealed, victim.offset, bytes(victim.size))  # as if it were never written
    async with walasync.open(log_dir, **OPTS) as wal:
        got, exc = await read_until_error(wal)
    assert exc is not None
    assert (exc.path, exc.offset) == (str(sealed), victim.offset)
    assert got == as_records(records[: victim.first_lsn - 1])


# One byte in each field of a segment header (all of it is covered by its checksum).
HEADER_FIELDS = {
    "magic": 3,
    "version": 8,
    "flags": 10,
    "salt": 13,
    "lsn": 20,
    "reserved": 25,
    "checksum": 30,
}


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
async def test_damaged_header_of_a_sealed_segment_is_found_by_read(
    log_dir: Path, field: str
) -> None:
    records = datas(40, size=200)
    await write_log(log_dir, records)
    sealed = segment_files(log_dir)[1]
    flip(sealed, HEADER_FIELDS[field])
    async with walasync.open(log_dir, **OPTS) as wal:
        got, exc = await read_until_error(wal)
    assert exc is not None
    assert (exc.path, exc.offset) == (str(sealed), 0)
    assert got == as_records(records[: first_lsn_of(sealed) - 1])


@pytest.fixture(scope="module")
def sealed_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """A pristine log of several segments (one batch per record), to copy and damage."""
    path = tmp_path_factory.mktemp("pristine") / "log"
    records = datas(45, size=250, seed=7) + [b""] * 3 + [b"x" * 5000]
    run("asyncio", write_log(path, records))
    assert len(segment_files(path)) >= 4
    return path, records


@loops
@settings(PROPERTY, max_examples=80)
@given(st.data())
def test_any_bit_flip_in_a_sealed_segment_is_detected_or_harmless(
    loop: str, sealed_log: tuple[Path, list[bytes]], data: st.DataObject
) -> None:
    pristine, records = sealed_log
    sealed = segment_files(pristine)[:-1]
    index = data.draw(st.integers(0, len(sealed) - 1), label="segment")
    raw = sealed[index].read_bytes()
    fs = frames(raw, first_lsn_of(sealed[index]))
    end = fs[-1].end
    at = data.draw(st.integers(0, end + 24) | st.integers(0, len(raw) - 1), label="offset")
    bit = data.draw(st.integers(0, 7), label="bit")
    # A flip the checksums cover must be detected (all 32 bytes of the segment header are:
    # its checksum covers the salt and the reserved bytes too); one in padding or well past
    # the data must not be. (A flip just past the data end may be either: the reader sees
    # bytes that are neither a batch nor zeros where the next batch would start.)
    covered = at < HEADER or any(f.offset <= at < f.covered_end for f in fs)
    harmless = at >= end + fmt.BATCH_HEADER or any(f.covered_end <= at < f.end for f in fs)

    async def main(path: Path) -> None:
        victim = segment_files(path)[index]
        flip(victim, at, 1 << bit)
        async with walasync.open(path, **OPTS) as wal:
            got, exc = await read_until_error(wal)
        # Never wrong data: whatever was read is the start of what was written.
        assert got == as_records(records[: len(got)])
        if exc is None:
            assert got == as_records(records)
            assert not covered
        else:
            assert exc.path == str(victim)
            assert exc.offset <= at
            assert not harmless

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log"
        shutil.copytree(pristine, path)
        run(loop, main(path))


@pytest.mark.parametrize("where", ["magic", "lsn", "payload"])
@pytest.mark.parametrize("nsegments", [1, 3])
async def test_damaged_middle_batch_of_the_last_segment_fails_open(
    log_dir: Path, where: str, nsegments: int
) -> None:
    records = datas(17 * (nsegments - 1) + 8, size=200)
    await write_log(log_dir, records)
    segments = segment_files(log_dir)
    assert len(segments) == nsegments
    last = segments[-1]
    fs = frames(last.read_bytes(), first_lsn_of(last))
    assert len(fs) >= 4
    victim = fs[len(fs) // 2]
    at = victim.offset + {"magic": 1, "lsn": 17, "payload": fmt.BATCH_HEADER + 5}[where]
    flip(last, at)
    before = last.read_bytes()

    exc = await open_fails(log_dir)
    assert exc.path == str(last)
    assert exc.offset == victim.offset <= at
    assert str(last) in str(exc)
    assert last.read_bytes() == before  # nothing "repaired": acknowledged data is there


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
async def test_damaged_header_of_the_last_segment_fails_open(log_dir: Path, field: str) -> None:
    await write_log(log_dir, datas(30, size=200))
    last = segment_files(log_dir)[-1]
    flip(last, HEADER_FIELDS[field])
    before = last.read_bytes()
    exc = await open_fails(log_dir)
    assert (exc.path, exc.offset) == (str(last), 0)
    assert last.read_bytes() == before


# -- salts: a batch is valid only in the segment it was written to ----------------------------


async def test_each_segment_has_its_own_salt(log_dir: Path) -> None:
    records = datas(60, size=200)
    await write_log(log_dir, records)
    segments = segment_files(log_dir)
    assert len(segments) >= 4
    salts = [salt_of(segment) for segment in segments]
    assert len(set(salts)) == len(salts)  # random 32-bit salts: ~1e-9 odds of failing
    for segment, salt in zip(segments, salts, strict=True):
        raw = segment.read_bytes()
        fs = frames(raw, first_lsn_of(segment))
        assert fs
        for f in fs:
            head = fmt.parse_batch_header(raw, f.offset)
            assert head is not None
            payload = raw[f.offset + fmt.BATCH_HEADER : f.covered_end]
            assert fmt.check_batch(head, payload, salt)
            assert not any(fmt.check_batch(head, payload, s) for s in salts if s != salt)


@pytest.mark.parametrize("other", ["previous segment", "no salt", "one bit off"])
async def test_next_batch_with_another_salt_is_a_torn_tail(log_dir: Path, other: str) -> None:
    """A whole batch after the valid end, with the right LSN, records and layout, but the
    checksum of another segment: not this segment's data, so a torn tail, zeroed at open."""
    records = datas(25, size=200)
    await write_log(log_dir, records)
    previous, last = segment_files(log_dir)[-2:]
    end, next_lsn = data_end(last)
    salt = {
        "previous segment": salt_of(previous),
        "no salt": 0,
        "one bit off": salt_of(last) ^ 1,
    }[other]
    assert salt != salt_of(last)
    lost = [b"not", b"this segment's"]
    write_at(last, end, b"".join(fmt.encode_batch(next_lsn, lost, salt)))
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 25
        check_zero_tail(last, end)
        assert await read_all(wal) == as_records(records)
        assert await wal.append(b"26") == 26
    assert await reopen_records(log_dir) == (as_records([*records, b"26"]), 26)


async def test_batch_with_another_salt_in_a_sealed_segment_is_found_by_read(
    log_dir: Path,
) -> None:
    records = datas(60, size=200)
    await write_log(log_dir, records)
    segments = segment_files(log_dir)
    sealed = segments[1]
    victim = frames(sealed.read_bytes(), first_lsn_of(sealed))[2]
    resalt(sealed, victim, salt_of(segments[0]))  # as if copied from the first segment
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 60
        got, exc = await read_until_error(wal)
        assert exc is not None
        assert (exc.path, exc.offset) == (str(sealed), victim.offset)
        assert got == as_records(records[: victim.first_lsn - 1])
        after = victim.first_lsn + victim.nrecords
        assert await read_all(wal, after) == as_records(records[after - 1 :], after)


@pytest.mark.parametrize("nsegments", [1, 3])
async def test_middle_batch_with_another_salt_in_the_last_segment_fails_open(
    log_dir: Path, nsegments: int
) -> None:
    """Valid batches of this segment follow it: acknowledged data would be lost, so this is
    corruption, not a torn tail, and nothing is "repaired"."""
    records = datas(17 * (nsegments - 1) + 8, size=200)
    await write_log(log_dir, records)
    last = segment_files(log_dir)[-1]
    fs = frames(last.read_bytes(), first_lsn_of(last))
    assert len(fs) >= 4
    victim = fs[len(fs) // 2]
    resalt(last, victim, salt_of(last) ^ 0x80000000)
    before = last.read_bytes()
    exc = await open_fails(log_dir)
    assert (exc.path, exc.offset) == (str(last), victim.offset)
    assert last.read_bytes() == before


async def test_last_segment_under_the_wrong_name_fails_open(log_dir: Path) -> None:
    await write_log(log_dir, datas(30, size=200))
    last = segment_files(log_dir)[-1]
    renamed = last.with_name(f"{first_lsn_of(last) + 1:020d}.wal")
    last.rename(renamed)
    exc = await open_fails(log_dir)
    assert (exc.path, exc.offset) == (str(renamed), 0)


async def test_last_segment_of_a_newer_format_fails_open(log_dir: Path) -> None:
    await write_log(log_dir, datas(5))
    (last,) = segment_files(log_dir)
    head = bytearray(last.read_bytes()[:HEADER])
    head[8] = max(fmt.READABLE_VERSIONS) + 1  # the version, then a fresh checksum
    head[28:32] = crc32c(bytes(head[:28])).to_bytes(4, "little")
    write_at(last, 0, bytes(head))
    exc = await open_fails(log_dir, UnsupportedFormatError)
    assert (exc.path, exc.offset) == (str(last), 0)


async def test_missing_middle_segment_is_a_gap(log_dir: Path) -> None:
    records = datas(60, size=200)
    await write_log(log_dir, records)
    segments = segment_files(log_dir)
    assert len(segments) >= 4
    segments[2].unlink()
    async with walasync.open(log_dir, **OPTS) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (1, 60)
        got, exc = await read_until_error(wal)
        assert exc is not None
        assert exc.path == str(segments[1])
        assert got == as_records(records[: first_lsn_of(segments[2]) - 1])
        # What lies after the gap is still readable.
        after = first_lsn_of(segments[3])
        assert await read_all(wal, after) == as_records(records[after - 1 :], after)
        # So is what lies before it, up to the gap.
        assert await read_all(wal, 1, after - 1 - 20) == as_records(records[: after - 21])


# -- other files in the directory -----------------------------------------------------------

FOREIGN = [
    "notes.txt",
    "99.wal",
    "0000000000000000099.wal",  # 19 digits
    "000000000000000000099.wal",  # 21 digits
    "00000000000000000099.wal.bak",
    "00000000000000000099.WAL",
    "00000000000000000099.wal~",
    ".00000000000000000099.wal",
    "00000000000000000099.wal\n",  # a trailing newline is not part of the pattern
    "０" * 18 + "９９.wal",  # fullwidth digits  # noqa: RUF001
    "\u0660" * 18 + "\u0669\u0669.wal",  # Arabic-Indic digits
]


@pytest.mark.parametrize("name", FOREIGN)
async def test_foreign_files_are_ignored(log_dir: Path, name: str) -> None:
    records = datas(30, size=200)
    await write_log(log_dir, records)
    segments = segment_files(log_dir)
    (log_dir / name).write_bytes(b"not a segment" * 10)
    async with walasync.open(log_dir, **OPTS) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (1, 30)
        assert await append_each(wal, [b"more"]) == [31]
        assert await read_all(wal) == as_records([*records, b"more"])
    assert (log_dir / name).read_bytes() == b"not a segment" * 10
    assert segment_files(log_dir)[: len(segments)] == segments


async def test_foreign_directory_is_ignored(log_dir: Path) -> None:
    await write_log(log_dir, datas(3))
    (log_dir / "backup").mkdir()
    (log_dir / "backup" / f"{1:020d}.wal").write_bytes(b"junk")
    assert await reopen_records(log_dir) == (as_records(datas(3)), 3)


@pytest.mark.parametrize(
    "content", [b"", b"\xff" * SEGMENT, fmt.encode_segment_header(4, 0x5EED) * 9]
)
async def test_leftover_spare_is_removed_at_open(log_dir: Path, content: bytes) -> None:
    records = datas(10, size=200)
    await write_log(log_dir, records)
    assert not (log_dir / "spare.tmp").exists()  # close removes its own
    (log_dir / "spare.tmp").write_bytes(content)
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 10
        spare = log_dir / "spare.tmp"  # gone, or a new one being zero-filled
        assert not spare.exists() or not spare.read_bytes().strip(b"\0")
        more = datas(40, size=200, seed=3)
        await append_each(wal, more)  # rotates into fresh spares, more than once
    assert not (log_dir / "spare.tmp").exists()
    got, _ = await reopen_records(log_dir)
    assert got == as_records(records + more)
    for segment in segment_files(log_dir)[1:]:
        end, _ = data_end(segment)
        check_zero_tail(segment, end)


async def test_spare_alone_is_not_a_log(log_dir: Path) -> None:
    os.mkdir(log_dir)
    header = fmt.encode_segment_header(1, 0x5EED)
    (log_dir / "spare.tmp").write_bytes(header + bytes(SEGMENT - HEADER))
    async with walasync.open(log_dir, **OPTS) as wal:
        assert (wal.first_lsn, wal.last_lsn) == (1, 0)
        assert await wal.append(b"first") == 1
    assert await reopen_records(log_dir) == ([Record(1, b"first")], 1)


# -- lost segments and sealing -----------------------------------------------------------------


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("lost", [1, 2])
async def test_lost_last_segments_fail_open_naming_the_missing_file(
    log_dir: Path, lost: int
) -> None:
    records = datas(60, size=200)
    await write_log(log_dir, records)
    segments = segment_files(log_dir)
    assert len(segments) > lost + 1
    for gone in segments[-lost:]:
        gone.unlink()
    before = listing(log_dir)
    exc = await open_fails(log_dir)
    assert exc.path == str(segments[-lost])  # the first file missing after the sealed one
    assert "missing" in str(exc)
    assert listing(log_dir) == before  # nothing repaired or made


async def test_every_segment_but_the_last_is_sealed_with_its_index(log_dir: Path) -> None:
    records = datas(60, size=200)
    await write_log(log_dir, records)
    *sealed, last = segment_files(log_dir)
    for segment in sealed:
        end, next_lsn = data_end(segment)
        data = segment.read_bytes()
        assert seal_end(segment, end) == len(data)  # the file ends with its seal
        head = fmt.parse_seal_header(data, end)
        assert head is not None and head.first_lsn == next_lsn
        lsns, offsets = fmt.decode_index(head, data[end + fmt.BATCH_HEADER :])
        assert list(offsets)[:1] == [HEADER] and lsns[0] == first_lsn_of(segment)
    assert seal_end(last, data_end(last)[0]) == data_end(last)[0]  # the last is open


async def test_empty_segment_after_an_unsealed_one_is_dropped(log_dir: Path) -> None:
    """A writer killed between creating a segment and sealing the one before it: the empty
    segment goes, and the one before is the last again (and gets sealed when it fills)."""
    records = datas(10, size=200)
    await write_log(log_dir, records)
    (first,) = segment_files(log_dir)
    empty = first.with_name(f"{11:020d}.wal")
    empty.write_bytes(fmt.encode_segment_header(11, 0x5EED) + bytes(SEGMENT - HEADER))
    more = datas(20, size=200, seed=5)
    async with walasync.open(log_dir, **OPTS) as wal:
        assert not empty.exists()
        assert wal.last_lsn == 10
        await append_each(wal, more)
    assert await reopen_records(log_dir) == (as_records(records + more), 30)
    assert seal_end(first, data_end(first)[0]) == first.stat().st_size  # sealed at last


async def test_empty_segment_after_a_sealed_one_is_kept(log_dir: Path) -> None:
    records = datas(17, size=200)  # exactly one full segment
    await write_log(log_dir, records)
    (first,) = segment_files(log_dir)
    seal(first)
    empty = first.with_name(f"{18:020d}.wal")
    empty.write_bytes(fmt.encode_segment_header(18, 0x5EED) + bytes(SEGMENT - HEADER))
    async with walasync.open(log_dir, **OPTS) as wal:
        assert wal.last_lsn == 17
        assert await wal.append(b"next") == 18
    assert empty.exists() and data_end(empty) == (HEADER + 32, 19)


async def test_empty_segment_after_an_unsealed_one_with_a_gap_is_corruption(
    log_dir: Path,
) -> None:
    records = datas(10, size=200)
    await write_log(log_dir, records)
    (first,) = segment_files(log_dir)
    empty = first.with_name(f"{14:020d}.wal")  # records 11..13 lost
    empty.write_bytes(fmt.encode_segment_header(14, 0x5EED) + bytes(SEGMENT - HEADER))
    exc = await open_fails(log_dir)
    assert exc.path == str(first)
    # The failed open kept the empty segment, the proof that LSN 13 was reached: opening
    # again fails again instead of going on from LSN 11 (LSNs handed out twice).
    assert empty.exists()
    assert (await open_fails(log_dir)).path == str(first)


def as_format_1(segment: Path) -> None:
    """Rewrite a segment's header as format 1 wrote it (no seal frames existed then)."""
    data = bytearray(segment.read_bytes())
    data[8:10] = (1).to_bytes(2, "little")
    data[28:32] = crc32c(bytes(data[:28])).to_bytes(4, "little")
    segment.write_bytes(bytes(data))


async def test_format_1_logs_are_read_and_continued(log_dir: Path) -> None:
    records = datas(40, size=200)
    await write_log(log_dir, records)
    segments = segment_files(log_dir)
    for segment in segments:  # unsealed, as format 1 left them
        end, _ = data_end(segment)
        segment.write_bytes(segment.read_bytes()[:end])
        as_format_1(segment)
    more = datas(30, size=200, seed=9)
    async with walasync.open(log_dir, **OPTS) as wal:
        assert await read_all(wal, 5) == as_records(records[4:], 5)
        await append_each(wal, more)  # rotates: seals the format 1 segment
    assert await reopen_records(log_dir) == (as_records(records + more), 70)
