"""Compression (`compression="zstd"`): round trips, logs that mix compressed and plain
segments, the format unchanged byte for byte with compression off, decompression bombs,
torn and damaged compressed batches, a missing zstandard, and power loss at every step of
compressed workloads (with the crash simulation of test_crash_sim.py)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import loops, run, segment_files
from hypothesis import given, settings
from hypothesis import strategies as st
from test_crash_sim import (
    LOG,
    ROOT,
    SHOW,
    BackCutSession,
    Image,
    Session,
    check_images,
    failure_of,
)

import walasync
from walasync import CorruptionError, Record, UnsupportedFormatError
from walasync import _compress as zc
from walasync import _format as fmt
from walasync import _segment as seg
from walasync.testing import SimulatedDisk

zstd = pytest.importorskip("zstandard")

ZSTD: dict[str, Any] = {"compression": "zstd"}
TYPES = ("order_created", "order_filled", "order_cancelled", "payment_captured", "user_login")


def event(i: int) -> bytes:
    """A JSON event of about 150 bytes: compressible, as events are, and unique."""
    return json.dumps(
        {
            "id": i,
            "type": TYPES[i % len(TYPES)],
            "user": f"u{i * 7919 % 100000:06d}",
            "amount": i * 37 % 100000 / 100,
            "currency": "EUR",
            "source": ("web", "ios", "android")[i % 3],
        }
    ).encode()


def walk(segment: Path | bytes) -> list[tuple[int, fmt.BatchHeader]]:
    """The valid batches of a segment file (or its bytes), as stored: (offset, header)."""
    data = segment if isinstance(segment, bytes) else segment.read_bytes()
    header = fmt.decode_segment_header(data[: fmt.SEGMENT_HEADER])
    out = []
    pos, lsn = fmt.SEGMENT_HEADER, header.first_lsn
    while pos + fmt.BATCH_HEADER <= len(data):
        head = fmt.parse_batch_header(data, pos)
        if head is None or head.first_lsn != lsn:
            break
        payload = data[pos + fmt.BATCH_HEADER : pos + fmt.BATCH_HEADER + head.length]
        if len(payload) != head.length or not fmt.check_batch(head, payload, header.salt):
            break
        out.append((pos, head))
        pos += head.size
        lsn += head.nrecords
    return out


def version(segment: Path) -> int:
    return fmt.decode_segment_header(segment.read_bytes()[: fmt.SEGMENT_HEADER]).version


def stored_bytes(log: Path) -> int:
    """Bytes of batches in the log's segments (headers and padded payloads)."""
    return sum(head.size for s in segment_files(log) for _, head in walk(s))


def write_at(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


async def read_all(
    wal: walasync.Wal | walasync.ReadOnlyWal, start: int | None = None
) -> list[Record]:
    return [r async for r in wal.read(start)]


async def append_concurrently(wal: walasync.Wal, records: list[bytes], n: int = 32) -> None:
    """Append `records` in order of LSN from `n` coroutines taking turns (so that batches
    hold many records), checking each LSN."""
    it = iter(enumerate(records, wal.last_lsn + 1))
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for item in it:
        queue.put_nowait(item)

    async def appender() -> None:
        while not queue.empty():
            lsn, data = queue.get_nowait()
            assert await wal.append(data) == lsn

    await asyncio.gather(*(appender() for _ in range(n)))


# -- round trips -------------------------------------------------------------------------------


async def test_round_trip_with_seeks_on_compressed_segments(log_dir: Path, tmp_path: Path) -> None:
    records = [event(i) for i in range(4000)]
    async with walasync.open(log_dir, segment_size=32 << 10, **ZSTD) as wal:
        await append_concurrently(wal, records[:3900])
        for data in records[3900:]:  # one record per batch too
            await wal.append(data)
        assert await read_all(wal) == [Record(i, d) for i, d in enumerate(records, 1)]
        for start in (2, 777, 2500, 3899, 3900, 3901, 3999, 4000):
            assert [r.data async for r in wal.read(start, start + 300)] == records[
                start - 1 : start + 300
            ]
    segments = segment_files(log_dir)
    assert len(segments) >= 3
    assert {version(s) for s in segments} == {fmt.ZSTD_VERSION}
    heads = [head for s in segments for _, head in walk(s)]
    assert sum(h.nrecords for h in heads) == len(records)
    assert sum(h.compressed for h in heads) > len(heads) // 2
    # A plain log of the same records takes several times the room.
    plain = tmp_path / "plain"
    async with walasync.open(plain, segment_size=32 << 10) as wal:
        await append_concurrently(wal, records)
    assert stored_bytes(log_dir) * 2 < stored_bytes(plain)
    # Read back whatever the reader's setting: without compression, and read-only.
    async with walasync.open(log_dir, segment_size=32 << 10) as wal:
        assert [r.data for r in await read_all(wal, 1234)] == records[1233:]
    async with walasync.open(log_dir, readonly=True) as ro:
        assert [r.data for r in await read_all(ro)] == records
        assert [r.data async for r in ro.read(3321, 3400)] == records[3320:3400]


def seal_of(segment: Path) -> seg.Seal | None:
    io = walasync.FileIO()
    fd = io.open_read(str(segment))
    try:
        salt = seg.read_header(io, fd, str(segment), int(segment.stem))
        return seg.read_seal(io, fd, salt)
    finally:
        io.close(fd)


async def test_seek_uses_the_index_of_compressed_sealed_segments(log_dir: Path) -> None:
    """Sealed compressed segments carry an index of stored offsets; a read that seeks with
    it lands on the right batch (a wrong offset would fail the checksum or the LSN)."""
    records = [event(i) for i in range(2500)]
    async with walasync.open(log_dir, segment_size=48 << 10, max_batch_bytes=2048, **ZSTD) as wal:
        await append_concurrently(wal, records, n=8)
    seal = await asyncio.get_running_loop().run_in_executor(
        None, seal_of, segment_files(log_dir)[0]
    )
    assert seal is not None and len(seal.index.lsns) >= 3
    async with walasync.open(log_dir, segment_size=48 << 10, **ZSTD) as wal:
        for lsn in [*seal.index.lsns, *(x + 1 for x in seal.index.lsns), seal.next_lsn - 1]:
            got = [r async for r in wal.read(lsn, lsn + 2)]
            assert got == [Record(i, records[i - 1]) for i in range(lsn, lsn + 3)]


async def test_incompressible_records_are_written_plain(log_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(5)
    records = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(150)]
    for path, options in ((log_dir, ZSTD), (tmp_path / "plain", {})):
        async with walasync.open(path, segment_size=32 << 10, **options) as wal:
            await append_concurrently(wal, records, n=8)
            assert [r.data for r in await read_all(wal)] == records
    heads = [head for s in segment_files(log_dir) for _, head in walk(s)]
    assert not any(h.compressed for h in heads)
    assert stored_bytes(log_dir) == stored_bytes(tmp_path / "plain")


async def test_mixed_log_plain_then_compressed_then_plain(log_dir: Path) -> None:
    """Each segment's format version says what it may hold: compressed batches only in
    version 3 segments, which are written only with compression on; every reader reads
    the whole log, whatever its own setting."""
    records = [event(i) for i in range(1200)]
    small: dict[str, Any] = {"segment_size": 8192}
    async with walasync.open(log_dir, **small) as wal:
        await append_concurrently(wal, records[:400], n=8)
    async with walasync.open(log_dir, **small, **ZSTD) as wal:
        await append_concurrently(wal, records[400:800], n=8)
        assert [r.data for r in await read_all(wal)] == records[:800]
    async with walasync.open(log_dir, **small) as wal:
        await append_concurrently(wal, records[800:], n=8)
        assert [r.data for r in await read_all(wal)] == records
    segments = segment_files(log_dir)
    versions = [version(s) for s in segments]
    # Plain; from the first rotation with compression on, version 3; from the first one
    # with it off again, plain.
    assert [v for v, _ in itertools.groupby(versions)] == [2, 3, 2]
    assert versions.count(3) >= 2
    last3 = max(i for i, v in enumerate(versions) if v == 3)
    for i, s in enumerate(segments):
        compressed = [head.compressed for _, head in walk(s)]
        if versions[i] == 2:
            assert not any(compressed), f"a compressed batch in version 2 segment {s.name}"
        elif i != last3:  # (the last one also holds plain batches, after the switch)
            assert sum(compressed) > len(compressed) // 2, s.name
    for options in ({}, ZSTD):
        async with walasync.open(log_dir, **small, **options) as wal:
            assert [r.data for r in await read_all(wal)] == records
            assert [r.data for r in await read_all(wal, 555)] == records[554:]
    async with walasync.open(log_dir, readonly=True) as ro:
        assert [r.data for r in await read_all(ro)] == records


async def test_a_new_compressed_log_starts_with_a_version_3_segment(log_dir: Path) -> None:
    async with walasync.open(log_dir, **ZSTD) as wal:
        await wal.append(event(1) * 4)
    (segment,) = segment_files(log_dir)
    assert version(segment) == fmt.ZSTD_VERSION
    ((_, head),) = walk(segment)
    assert head.compressed


async def test_a_reader_of_versions_1_and_2_refuses_a_compressed_log(
    log_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older walasync never takes a compressed batch for a torn tail (and cuts it): the
    segments that may hold one are of a version it refuses."""
    async with walasync.open(log_dir, **ZSTD) as wal:
        await wal.append_many([event(i) for i in range(50)])
    async with walasync.open(tmp_path / "plain") as wal:
        await wal.append_many([event(i) for i in range(50)])
    monkeypatch.setattr(fmt, "READABLE_VERSIONS", (1, 2))
    with pytest.raises(UnsupportedFormatError):
        await walasync.open(log_dir)
    async with walasync.open(tmp_path / "plain") as wal:
        assert wal.last_lsn == 50


# Digest of a log written with compression off by the code before compression existed
# (fixed salts; META without its random log id), computed once from that code: writing
# without compression is unchanged byte for byte.
GOLDEN = "d6be4d0e88862b0e65d303efdbf1f3eba3b5b1d0286ca25fcd4b5a605b3be5c9"


@pytest.mark.parametrize("options", [{}, {"compression": None}, {"compression_level": 19}])
async def test_compression_off_writes_the_same_bytes_as_before(
    log_dir: Path, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seg, "_salts", random.Random(20261201))
    async with walasync.open(log_dir, segment_size=4096, **options) as wal:
        await asyncio.gather(
            *(wal.append(b'{"event": %d, "kind": "order_filled"}' % i) for i in range(40))
        )
        for i in range(30):
            await wal.append(
                b'{"event": %d, "kind": "order_filled", "pad": "%s"}' % (i, b"x" * (i * 7))
            )
        await wal.append_many([b"unit-%d" % i * 20 for i in range(5)])
        await wal.append(b"")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(log_dir)):
        data = (log_dir / name).read_bytes()
        if name == "META":
            data = data[:16] + data[32:68]
        digest.update(name.encode() + b"\0" + data)
    assert digest.hexdigest() == GOLDEN


# -- the frame ---------------------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None)
RECORDS = st.lists(
    st.binary(max_size=300)
    | st.builds(lambda n, b: b * n, st.integers(0, 400), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=40,
)


@PROPERTY
@given(RECORDS, st.integers(0, 2**32 - 1), st.integers(1, 2**40), st.integers(-5, 9), st.data())
def test_compressed_frame_round_trips(
    records: list[bytes], salt: int, first_lsn: int, level: int, data: st.DataObject
) -> None:
    joined = (
        sorted(data.draw(st.sets(st.integers(0, len(records) - 2)))) if len(records) > 1 else []
    )
    compress = zc.Compressor(level)
    head_bytes, body = fmt.encode_batch(first_lsn, records, salt, joined, compress)
    plain_head, plain_body = fmt.encode_batch(first_lsn, records, salt, joined)
    assert len(body) % 8 == 0
    head = fmt.parse_batch_header(head_bytes)
    assert head is not None and (head.first_lsn, head.nrecords) == (first_lsn, len(records))
    payload = body[: head.length]
    assert fmt.check_batch(head, payload, salt)
    # Compressed only when it is shorter; otherwise exactly the plain frame.
    if head.compressed:
        assert head.length < 4 * len(records) + sum(map(len, records))
    else:
        assert (head_bytes, body) == (plain_head, plain_body)
    # The checksum covers the kind of batch, and the salt.
    assert not fmt.check_batch(head._replace(compressed=not head.compressed), payload, salt)
    assert not fmt.check_batch(head, payload, salt ^ 1)
    expanded, plain = fmt.expand(head, payload, max(map(len, records)))
    assert not expanded.compressed and expanded.first_lsn == first_lsn
    assert fmt.decode_records(expanded, plain) == records
    assert fmt.joined_records(expanded, plain) == joined


def test_compressible_batches_are_compressed() -> None:
    records = [event(i) for i in range(100)]
    head_bytes, body = fmt.encode_batch(1, records, 7, (), zc.Compressor(3))
    head = fmt.parse_batch_header(head_bytes)
    assert head is not None and head.compressed
    assert len(body) * 3 < sum(map(len, records))
    with pytest.raises(fmt.FormatError, match="expanded"):
        fmt.decode_records(head, body[: head.length])


@pytest.mark.parametrize("plain", [b"", b"x" * (zc.MIN_INPUT - 1)])
def test_tiny_payloads_are_not_compressed(plain: bytes) -> None:
    assert zc.Compressor(3)(plain) is None


# -- decompression bombs and damaged frames ------------------------------------------------------


def rle_bomb(size: int) -> bytes:
    """A zstd frame declaring `size` bytes, made of RLE blocks of 128 KiB (4 bytes each):
    it expands about 30,000 times."""
    out = [struct.pack("<IB", 0xFD2FB528, 0xE0), struct.pack("<Q", size)]
    block = 128 << 10
    left = size
    while left:
        n = min(block, left)
        left -= n
        header = (n << 3) | (1 << 1) | (left == 0)  # RLE block, last or not
        out.append(header.to_bytes(3, "little") + b"x")
    return b"".join(out)


def raw_frame(plain: bytes, declared: int) -> bytes:
    """A zstd frame of one raw block holding `plain`, declaring `declared` bytes."""
    header = (len(plain) << 3) | 1  # raw, last
    return struct.pack("<IBQ", 0xFD2FB528, 0xE0, declared) + header.to_bytes(3, "little") + plain


def test_a_bomb_is_refused_before_any_allocation() -> None:
    frame = rle_bomb(1 << 30)  # 1 GiB from 32 KiB
    assert len(frame) < 40 << 10
    with pytest.raises(zc.ExpandError, match="expands to 1073741824 bytes"):
        zc.decompress(frame, 4, 1 << 31)
    # MAX_EXPANDED caps any limit the record count allows.
    with pytest.raises(zc.ExpandError, match=f"expands to {zc.MAX_EXPANDED + 8} bytes"):
        zc.decompress(rle_bomb(zc.MAX_EXPANDED + 8), 4, 1 << 31)
    # The same frame, honest about a size within the limits, is fine: it is the claim that
    # is bounded.
    small = rle_bomb(1 << 20)
    assert zc.decompress(small, 4, 1 << 20) == b"x" * (1 << 20)
    with pytest.raises(zc.ExpandError, match="expands to 1048576 bytes"):
        zc.decompress(small, 4, (1 << 20) - 1)


def _frames() -> dict[str, Callable[[bytes], bytes]]:
    def no_size(plain: bytes) -> bytes:
        return bytes(zstd.ZstdCompressor(write_content_size=False).compress(plain))

    return {
        "no declared size": no_size,
        "trailing bytes": lambda p: zstd.ZstdCompressor().compress(p) + b"tail",
        "garbage": lambda p: b"not a zstd frame at all" * 3,
        "two frames": lambda p: zstd.ZstdCompressor().compress(p) * 2,
        "under the length table": lambda p: zstd.ZstdCompressor().compress(b"ab"),
        "over count x max_record_size": lambda p: zstd.ZstdCompressor().compress(p + bytes(2000)),
        "lengths that do not add up": lambda p: zstd.ZstdCompressor().compress(p + b"extra"),
        "a bomb": lambda p: rle_bomb(1 << 30),
        "declares fewer bytes than it holds": lambda p: raw_frame(p, len(p) - 1),
        "declares more bytes than it holds": lambda p: raw_frame(p, len(p) + 1),
        "honest raw frame, but lengths that do not add up": lambda p: raw_frame(p[1:], len(p) - 1),
    }


FRAMES = _frames()


@pytest.mark.parametrize("kind", list(FRAMES))
async def test_a_bad_compressed_batch_is_corruption_at_its_offset(log_dir: Path, kind: str) -> None:
    """A compressed batch whose checksum is right (as a crafted or buggy one would be) but
    whose frame is not what the format allows: the records before it are read, then a
    CorruptionError names the file and the batch's offset. Opening does not decompress."""
    good = [event(i) for i in range(20)]
    async with walasync.open(log_dir, max_record_size=1000, **ZSTD) as wal:
        for data in good:
            await wal.append(data)
    (segment,) = segment_files(log_dir)
    offset, last = walk(segment)[-1]
    end = offset + last.size
    salt = fmt.decode_segment_header(segment.read_bytes()[:32]).salt
    victims = [b"v" * 300, b"w" * 200]
    head, body = fmt.encode_batch(21, victims, salt, (), FRAMES[kind])
    assert fmt.parse_batch_header(head) is not None
    write_at(segment, end, head + body)
    if kind == "honest raw frame, but lengths that do not add up":  # the frame itself is fine
        assert zc.decompress(FRAMES[kind](bytes(508)), 8, 2008) == bytes(507)
    async with walasync.open(log_dir, max_record_size=1000) as wal:
        assert wal.last_lsn == 22
        got: list[Record] = []
        with pytest.raises(CorruptionError) as info:
            async for r in wal.read():
                got.append(r)  # noqa: PERF401 - keep what came before the error
        assert got == [Record(i, d) for i, d in enumerate(good, 1)]
        assert (info.value.path, info.value.offset) == (str(segment), end)
        assert "compressed batch" in info.value.reason or "lengths" in info.value.reason
    problem = (await asyncio.to_thread(walasync.verify, log_dir)).problem  # it expands too
    assert problem is not None and (problem.path, problem.offset) == (str(segment), end)
    assert problem.lsn == 21


async def test_verify_expands_compressed_batches(log_dir: Path) -> None:
    """A sound compressed log verifies, every record counted (verify once took any
    compressed batch for damage, and repair would have cut the whole log)."""
    async with walasync.open(log_dir, segment_size=4096, **ZSTD) as wal:
        for i in range(200):
            await wal.append(event(i))
    assert len(segment_files(log_dir)) > 2
    report = await asyncio.to_thread(walasync.verify, log_dir)
    assert report.ok, report.problem
    assert (report.records, report.first_lsn, report.last_lsn) == (200, 1, 200)
    assert (await asyncio.to_thread(walasync.repair, log_dir, dry_run=True)).records_cut == 0


async def test_a_batch_over_the_readers_max_record_size_is_refused(log_dir: Path) -> None:
    big = json.dumps({"items": [event(i).decode() for i in range(40)]}).encode()
    assert len(big) > 5000
    async with walasync.open(log_dir, **ZSTD) as wal:
        await wal.append(big)
    async with walasync.open(log_dir, readonly=True, max_record_size=5000) as ro:
        with pytest.raises(CorruptionError, match="max_record_size"):
            await read_all(ro)
    async with walasync.open(log_dir, readonly=True, max_record_size=len(big)) as ro:
        assert [r.data for r in await read_all(ro)] == [big]
    async with walasync.open(log_dir, max_record_size=5000) as wal:
        with pytest.raises(CorruptionError, match="max_record_size"):
            await read_all(wal)


def test_scan_expands_about_a_chunk_at_a_time(tmp_path: Path) -> None:
    """Memory stays bounded however well batches compress: a scan that expands stops once
    it holds `max_bytes` of expanded payloads, not `max_bytes` of stored ones."""
    log = tmp_path / "log"

    async def write() -> None:
        async with walasync.open(log, **ZSTD) as wal:
            for i in range(100):
                await wal.append(b"%d" % i + bytes(64 << 10))

    run("asyncio", write())
    (segment,) = segment_files(log)
    assert segment.stat().st_size > 0 and stored_bytes(log) < 64 << 10  # 100 batches stored
    io = walasync.FileIO()
    fd = io.open_read(str(segment))
    try:
        salt = seg.read_header(io, fd, str(segment), 1)
        scan = seg.Scan(io, fd, str(segment), salt, fmt.SEGMENT_HEADER, 1, expand=1 << 20)
        first = scan.batches(1 << 20)
        raw = seg.Scan(io, fd, str(segment), salt, fmt.SEGMENT_HEADER, 1).batches(1 << 20)
    finally:
        io.close(fd)
    assert 16 <= len(first) <= 17 and sum(len(p) for _, _, p in first) <= (1 << 20) + (65 << 10)
    assert len(raw) == 100 and all(h.compressed for _, h, _ in raw)  # recovery's view


# -- damage and torn tails -----------------------------------------------------------------------


async def write_compressed(log_dir: Path, n: int = 300) -> list[bytes]:
    """`n` events in units of 5 appended 4 at a time (so batches hold several units)."""
    records = [event(i) for i in range(n)]
    async with walasync.open(log_dir, segment_size=16384, **ZSTD) as wal:
        for i in range(0, n, 20):
            await asyncio.gather(
                *(wal.append_many(records[j : j + 5]) for j in range(i, i + 20, 5))
            )
            assert wal.last_lsn == min(i + 20, n)
    return records


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
async def test_a_torn_compressed_batch_at_the_tail_is_repaired(log_dir: Path, keep: float) -> None:
    records = await write_compressed(log_dir, 120)
    (segment,) = segment_files(log_dir)
    offset, head = walk(segment)[-1]
    assert head.compressed and head.first_lsn + head.nrecords == 121
    cut = offset + fmt.BATCH_HEADER + int(head.length * keep)
    write_at(segment, cut, bytes(head.size - (cut - offset)))  # the rest never landed
    async with walasync.open(log_dir, segment_size=16384, **ZSTD) as wal:
        assert wal.last_lsn == head.first_lsn - 1
        assert segment.read_bytes()[offset : offset + head.size] == bytes(head.size)  # zeroed
        await wal.append_many(records[wal.last_lsn :])
    async with walasync.open(log_dir, readonly=True) as ro:
        assert [r.data for r in await read_all(ro)] == records


async def test_damage_before_a_valid_compressed_batch_fails_open(log_dir: Path) -> None:
    """Invalid bytes followed by a valid compressed batch in the last segment mean lost
    acknowledged records: recovery looks for compressed batches too, never cuts them."""
    await write_compressed(log_dir, 120)
    (segment,) = segment_files(log_dir)
    batches = walk(segment)
    offset, _ = batches[2]
    write_at(segment, offset + fmt.BATCH_HEADER + 3, b"\xff\xfe")
    with pytest.raises(CorruptionError) as info:
        await walasync.open(log_dir, **ZSTD)
    assert (info.value.path, info.value.offset) == (str(segment), offset)
    assert f"valid batch at offset {batches[3][0]}" in info.value.reason


@pytest.mark.parametrize("to", ["plain", "compressed"])
async def test_a_changed_batch_magic_is_caught(log_dir: Path, to: str) -> None:
    """The checksum of a compressed batch covers its magic: a plain batch does not pass for
    a compressed one, nor the other way round."""
    records = [event(i) for i in range(300)]
    async with walasync.open(log_dir, segment_size=4096, **ZSTD) as wal:
        await wal.append(b"tiny")  # plain: too short to compress
        for i in range(1, 300, 30):
            await wal.append_many(records[i : i + 30])
    first, *rest = segment_files(log_dir)
    assert rest  # the first one is sealed: read finds the damage
    batches = walk(first)
    want = to == "plain"  # change a compressed batch into a plain one, or the reverse
    offset, _ = next((o, h) for o, h in batches if h.compressed == want)
    magic = fmt.BATCH_MAGIC if want else fmt.ZSTD_MAGIC
    write_at(first, offset, magic.to_bytes(4, "little"))
    async with walasync.open(log_dir, segment_size=4096) as wal:
        with pytest.raises(CorruptionError) as info:
            await read_all(wal)
    assert (info.value.path, info.value.offset) == (str(first), offset)


# -- truncation and followers on compressed segments --------------------------------------------


async def test_truncate_back_inside_a_compressed_batch(log_dir: Path) -> None:
    """A cut inside a compressed batch expands it to keep its first records (and to see
    where its units end)."""
    records = await write_compressed(log_dir, 200)
    heads = [h for s in segment_files(log_dir) for _, h in walk(s)]
    batch = next(h for h in reversed(heads) if h.compressed and h.nrecords >= 10)
    cut = batch.first_lsn + 4  # the end of its first unit of 5
    async with walasync.open(log_dir, segment_size=16384, **ZSTD) as wal:
        with pytest.raises(ValueError, match="unit"):
            await wal.truncate_back(cut - 2)
        await wal.truncate_back(cut)
        assert wal.last_lsn == cut
        assert [r.data for r in await read_all(wal, cut - 20)] == records[cut - 21 : cut]
        await wal.append_many(records[cut : cut + 10])
        await wal.truncate_front(33)
        assert [r.data for r in await read_all(wal)] == records[32 : cut + 10]
    async with walasync.open(log_dir, segment_size=16384, **ZSTD) as wal:
        assert [r.data for r in await read_all(wal, 40)] == records[39 : cut + 10]


async def test_follow_a_compressed_log(log_dir: Path) -> None:
    records = [event(i) for i in range(500)]
    async with walasync.open(log_dir, segment_size=16384, **ZSTD) as wal:

        async def follow() -> list[bytes]:
            return [r.data async for r in wal.read(1, len(records), follow=True)]

        follower = asyncio.ensure_future(follow())
        await append_concurrently(wal, records, n=16)
        assert await follower == records


# -- zstandard missing, and options ------------------------------------------------------------


def test_compression_without_zstandard_is_an_import_error_naming_the_extra(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ImportError, match=r"walasync\[zstd\]"):
        walasync.open(log_dir, compression="zstd")
    assert not log_dir.exists()


async def test_a_compressed_log_without_zstandard(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery never decompresses, so the log opens and takes (plain) appends; reading a
    compressed batch is an UnsupportedFormatError naming the extra, after the records
    before it."""
    records = [b"plain before"] + [event(i) for i in range(100)]
    async with walasync.open(log_dir, **ZSTD) as wal:
        await wal.append(records[0])
        await wal.append_many(records[1:])
    (segment,) = segment_files(log_dir)
    offset = walk(segment)[1][0]
    monkeypatch.setitem(sys.modules, "zstandard", None)
    async with walasync.open(log_dir) as wal:
        assert await wal.append(b"after") == 102
        got: list[Record] = []
        with pytest.raises(UnsupportedFormatError, match=r"walasync\[zstd\]") as info:
            async for r in wal.read():
                got.append(r)  # noqa: PERF401
        assert got == [Record(1, b"plain before")]
        assert (info.value.path, info.value.offset) == (str(segment), offset)
        assert isinstance(info.value, CorruptionError)
        assert [r.data async for r in wal.read(102)] == [b"after"]
    async with walasync.open(log_dir, readonly=True) as ro:
        with pytest.raises(UnsupportedFormatError):
            await read_all(ro)


@pytest.mark.parametrize(
    "options",
    [
        {"compression": "lz4"},
        {"compression": "ZSTD"},
        {"compression": "zstd", "compression_level": 23},
        {"compression": "zstd", "compression_level": -(1 << 17) - 1},
        {"compression": "zstd", "compression_level": True},
        {"compression": "zstd", "compression_level": 3.0},
    ],
)
def test_bad_compression_options(log_dir: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="compression"):
        walasync.open(log_dir, **options)
    with pytest.raises(ValueError, match="compression"):
        walasync.Options(**options)


def test_readonly_max_record_size_is_checked(log_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_record_size"):
        walasync.open(log_dir, readonly=True, max_record_size=0)


def test_importing_walasync_does_not_import_zstandard() -> None:
    code = "import sys, walasync; assert 'zstandard' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- power loss at every step ------------------------------------------------------------------


def compressible(tag: str, size: int, rng: random.Random) -> bytes:
    """A record of about `size` bytes that compresses (JSON-like), unique by its tag."""
    words = [b'"kind": "order_filled"', b'"qty": %d' % rng.randrange(100), b'"eur": 12.5']
    body = b", ".join(rng.choice(words) for _ in range(size // 20 + 1))
    return (tag.encode() + b"|{" + body + b"}")[: max(size, len(tag) + 1)]


def compressed_workload(seed: int, phases: list[dict[str, Any]]) -> Callable[[Session], Any]:
    """Concurrent appenders and units of compressible records, a phase per options set
    (closed and reopened between): compression switched on and off across rotations."""

    async def workload(s: Session) -> None:
        rng = random.Random(seed)
        for p, options in enumerate(phases):
            async with await walasync.open(LOG, io=s.disk, **{**s.opts, **options}) as wal:
                s.wal = wal

                async def appender(i: int, p: int = p, wal: walasync.Wal = wal) -> None:
                    for j in range(rng.randint(2, 5)):
                        if rng.random() < 0.3:
                            unit = [
                                compressible(f"u{p}.{i}.{j}.{k}", rng.randint(0, 600), rng)
                                for k in range(rng.randint(1, 4))
                            ]
                            assert await s.append_many(wal, unit)
                        else:
                            data = compressible(f"a{p}.{i}.{j}", rng.randint(0, 1500), rng)
                            assert await s.append(wal, data)
                        if rng.random() < 0.5:
                            await asyncio.sleep(0)

                await asyncio.gather(*(appender(i) for i in range(6)))

    return workload


def disk_segments(disk: SimulatedDisk) -> list[bytes]:
    return [data for name, data in sorted(disk.files(LOG).items()) if name.endswith(".wal")]


def simulate_compressed(loop: str, phases: list[dict[str, Any]], seed: int) -> int:
    """Run the compressed workload once (compression on unless a phase turns it off), then
    check every crash image it left (recovered with compression on)."""
    opts = {"segment_size": 4096, **ZSTD}

    async def main() -> int:
        session = Session(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, seed=seed)
        await compressed_workload(seed, phases)(session)
        segments = disk_segments(session.disk)
        assert any(h.compressed for data in segments for _, h in walk(data))
        versions = {fmt.decode_segment_header(data).version for data in segments}
        assert versions == ({2, 3} if {"compression": None} in phases else {3})
        return await check_images(session, seed, nested=1)

    return run(loop, main())


@loops
def test_crash_at_every_step_of_compressed_appends(loop: str) -> None:
    assert simulate_compressed(loop, [{}, {}, {}], seed=31) > 100


@loops
def test_crash_at_every_step_of_switching_compression(loop: str) -> None:
    phases = [{"compression": None}, {}, {"compression": None}]
    assert simulate_compressed(loop, phases, seed=32) > 100


@loops
def test_crash_at_every_step_of_truncate_back_in_compressed_batches(loop: str) -> None:
    """The cut's rewritten batch (the kept records of a compressed batch, in META, then in
    the segment) survives a crash at any step like any other."""
    opts: dict[str, Any] = {"segment_size": 4096, **ZSTD}

    async def workload(s: BackCutSession) -> None:
        rng = random.Random(9)
        async with await s.open() as wal:
            for phase in range(3):

                async def appender(i: int, phase: int = phase) -> None:
                    for j in range(rng.randint(2, 4)):
                        n = 1 if rng.random() < 0.6 else rng.randint(2, 4)
                        tags = [f"c{phase}.{i}.{j}.{k}" for k in range(n)]
                        await s.add(wal, [compressible(t, rng.randint(30, 700), rng) for t in tags])

                await asyncio.gather(*(appender(i) for i in range(4)))
                ends = [lsn for lsn, end in s.unit_end.items() if lsn == end and lsn in s.log]
                await s.truncate_back(wal, rng.choice(ends[len(ends) // 2 :]))
            await s.add(wal, [b"after the cuts"])

    async def check(image: Image, states: list[tuple[dict[int, bytes], frozenset[bytes]]]) -> None:
        async with walasync.open(LOG, io=image.disk.crash(), **opts) as wal:
            records = [r async for r in wal.read()]
            last = wal.last_lsn
        assert [r.lsn for r in records] == list(range(1, last + 1)), "LSNs not dense"
        assert any(
            (records[-1].lsn if records else 0) >= max(log, default=0)
            and all(d == log[n] if n in log else d in extra for n, d in records)
            for log, extra in states
        ), f"recovered log (last {last}) fits no state the cut allows"

    async def main() -> int:
        session = BackCutSession(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, 33)
        await workload(session)
        session.stop()
        segments = disk_segments(session.disk)
        assert any(h.compressed for data in segments for _, h in walk(data))
        failures = []
        for image, states in zip(session.images, session.states, strict=True):
            error = await failure_of(check(image, states))
            if error is not None:
                failures.append(f"{image}: {error}")
        assert not failures, "\n".join(failures[:SHOW])
        return len(session.images)

    assert run(loop, main()) > 100
