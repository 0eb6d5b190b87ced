"""The keyed view (`walasync.open_keyed`): its record format, its index and the index snapshot.

The index is checked against the log itself: `expected` replays the log's records (read raw
through `KeyedLog.read`) into what the index must say, and `state` asks the index (through
`keys`, `records_for`, `latest` and `latest_lsn`) what it says.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import cancel_after, loops, run, small, until
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walasync
from walasync import CorruptionError, KeyedLog, KeyedRecord, MalformedRecordError, Record
from walasync._keyed import (
    INDEX_NAME,
    SnapshotError,
    decode_record,
    decode_snapshot,
    encode_record,
    encode_snapshot,
)
from walasync.testing import SimulatedDisk

Key = bytes | str
LOG_ID = bytes(range(16))
State = dict[Key, list[tuple[int, bytes]]]


def expected(records: list[KeyedRecord]) -> State:
    """What the index must hold after these records (a log's, from its first LSN)."""
    out: State = {}
    for lsn, key, value in records:
        if value is None:
            out.pop(key, None)
        else:
            out.setdefault(key, []).append((lsn, value))
    return out


async def state(kv: KeyedLog) -> State:
    """What the index says, through the public API; `latest` and `latest_lsn` must agree
    with `records_for`."""
    out: State = {}
    for key in kv.keys():
        records = [r async for r in kv.records_for(key)]
        assert all(r.key == key and r.value is not None for r in records)
        out[key] = [(r.lsn, r.value) for r in records]  # type: ignore[misc]
        latest = await kv.latest(key)
        assert latest is not None and (latest.lsn, latest.value) == out[key][-1], key
        assert kv.latest_lsn(key) == latest.lsn and key in kv
    assert len(kv) == len(out)
    return out


async def check(kv: KeyedLog) -> State:
    """The index says exactly what replaying the log gives, and holds each LSN once;
    returns what it says."""
    for lsns in kv._map.values():
        assert isinstance(lsns, int) or (len(lsns) > 1 and list(lsns) == sorted(set(lsns)))
    now = await state(kv)
    assert now == expected([r async for r in kv.read()])
    return now


# -- the record format -------------------------------------------------------------------------


def test_record_layout() -> None:
    assert encode_record(b"k", b"v") == b"\x01\x00\x01\x00kv"
    assert encode_record("ké", b"") == b"\x01\x01\x03\x00k\xc3\xa9"
    assert encode_record(b"", None) == b"\x01\x02\x00\x00"
    assert encode_record("x", None) == b"\x01\x03\x01\x00x"
    assert decode_record(b"\x01\x01\x03\x00k\xc3\xa9tail") == ("ké", b"tail")


# Every way a record can fail to be a keyed record, with what the error says.
MALFORMED = [
    (b"\x01\x00\x00", "short of a keyed header"),
    (b"\x02\x00\x00\x00", "version 2"),
    (b"\x01\x04\x00\x00", "flags"),
    (b"\x01\x00\x05\x00abcd", "key of 5 bytes"),
    (b"\x01\x01\x01\x00\xff", "not UTF-8"),
    (b"\x01\x02\x01\x00kv", "a delete with a value"),
]


@pytest.mark.parametrize(("data", "why"), MALFORMED)
def test_malformed_records_name_their_lsn(data: bytes, why: str) -> None:
    with pytest.raises(MalformedRecordError, match=why) as info:
        decode_record(data, 17, "/logs/x")
    err = info.value
    assert isinstance(err, CorruptionError)
    assert (err.path, err.lsn, err.offset) == ("/logs/x", 17, -1)
    assert "LSN 17" in str(err)


keys = st.one_of(st.binary(max_size=40), st.text(max_size=20))


@settings(max_examples=300, deadline=None)
@given(key=keys, value=st.one_of(st.none(), st.binary(max_size=64)))
def test_records_round_trip(key: Key, value: bytes | None) -> None:
    assert decode_record(encode_record(key, value)) == (key, value)
    assert KeyedRecord.from_record(Record(3, encode_record(key, value))) == (3, key, value)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=48))
def test_any_bytes_decode_canonically_or_raise_malformed(data: bytes) -> None:
    """Arbitrary bytes never crash the decoder: a MalformedRecordError, or a record that
    encodes back to exactly these bytes (one encoding per record)."""
    try:
        key, value = decode_record(data, 5)
    except MalformedRecordError as exc:
        assert exc.lsn == 5
    else:
        assert encode_record(key, value) == data


# -- the snapshot format -----------------------------------------------------------------------

indexes = st.dictionaries(
    keys,
    st.lists(st.integers(1, 500), min_size=1, max_size=5, unique=True).map(sorted),
    max_size=20,
)


def as_index(d: dict[Key, list[int]]) -> dict[Key, Any]:
    from array import array

    return {k: v[0] if len(v) == 1 else array("Q", v) for k, v in d.items()}


def as_lists(index: dict[Key, Any]) -> dict[Key, list[int]]:
    return {k: [v] if isinstance(v, int) else list(v) for k, v in index.items()}


@settings(max_examples=100, deadline=None)
@given(index=indexes, first=st.integers(1, 300))
def test_snapshot_round_trip_keeps_lsns_from_first_to_upto(
    index: dict[Key, list[int]], first: int
) -> None:
    upto = 400
    data = encode_snapshot(as_index(index).items(), 1, upto, (LOG_ID, 7, 9))
    lsn, fingerprint, back = decode_snapshot(data, first)
    assert (lsn, fingerprint) == (upto, (LOG_ID, 7, 9))
    want = {k: [n for n in v if first <= n <= upto] for k, v in index.items()}
    assert as_lists(back) == {k: v for k, v in want.items() if v}


@settings(max_examples=60, deadline=None)
@given(index=indexes, data=st.data())
def test_a_damaged_snapshot_is_always_detected(index: dict[Key, list[int]], data: Any) -> None:
    blob = encode_snapshot(as_index(index).items(), 1, 500, (LOG_ID, 1, 2))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    damaged = bytearray(blob)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SnapshotError):
        decode_snapshot(bytes(damaged))
    with pytest.raises(SnapshotError):
        decode_snapshot(blob[: data.draw(st.integers(0, len(blob) - 1))])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=120))
def test_any_bytes_as_a_snapshot_raise_only_snapshot_error(data: bytes) -> None:
    try:
        decode_snapshot(b"WALAKIDX" + data)
    except SnapshotError:
        pass


# -- the keyed log -----------------------------------------------------------------------------


async def test_append_latest_records_for_and_keys(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir) as kv:
        assert await kv.append("a", b"1") == 1
        assert await kv.append(b"a", b"2") == 2  # bytes and str keys are different keys
        assert await kv.append("a", bytearray(b"3")) == 3
        assert await kv.append("b", memoryview(b"4")) == 4
        assert kv.keys() == ["a", b"a", "b"]
        assert [(r.lsn, r.value) async for r in kv.records_for("a")] == [(1, b"1"), (3, b"3")]
        assert await kv.latest("a") == KeyedRecord(3, "a", b"3")
        assert await kv.latest(b"a") == KeyedRecord(2, b"a", b"2")
        assert await kv.latest("nope") is None
        assert [r async for r in kv.records_for("nope")] == []
        assert kv.latest_lsn("b") == 4 and kv.latest_lsn("nope") is None
        assert "a" in kv and b"b" not in kv and 3 not in kv
        assert len(kv) == 3
        assert await kv.append_many([("c", b"5"), ("a", None), ("a", b"6")]) == range(5, 8)
        assert await check(kv) == {
            b"a": [(2, b"2")],
            "b": [(4, b"4")],
            "c": [(5, b"5")],
            "a": [(7, b"6")],
        }
        assert "keys=4" in repr(kv) and "applied=7" in repr(kv)
    async with walasync.open_keyed(log_dir) as kv:
        assert kv.keys() == [b"a", "b", "c", "a"]
        assert await kv.latest("a") == KeyedRecord(7, "a", b"6")


async def test_delete_forgets_a_key_and_its_history(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir, snapshot_every=None) as kv:
        await kv.append("k", b"old")
        assert await kv.delete("k") == 2
        assert "k" not in kv and kv.keys() == [] and await kv.latest("k") is None
        assert await kv.delete("never there") == 3
        await kv.append("k", b"new")
        assert [r.value async for r in kv.records_for("k")] == [b"new"]
        assert [r async for r in kv.read()][1:3] == [
            KeyedRecord(2, "k", None),
            KeyedRecord(3, "never there", None),
        ]
    async with walasync.open_keyed(log_dir, snapshot_every=None) as kv:
        assert kv.replayed == 4
        assert await check(kv) == {"k": [(4, b"new")]}


async def test_bad_keys_and_values_write_nothing(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir, max_key_size=8) as kv:
        bad: list[tuple[Any, Any, type[Exception]]] = [
            (1, b"v", TypeError),
            (bytearray(b"k"), b"v", TypeError),
            ("k", "text", TypeError),
            ("k", None, TypeError),
            ("123456789", b"v", ValueError),
            (b"123456789", b"v", ValueError),
            ("\ud800", b"v", ValueError),  # a lone surrogate: not UTF-8
        ]
        for key, value, error in bad:
            with pytest.raises(error):
                await kv.append(key, value)
            if value is not None:  # in append_many, None is a delete
                with pytest.raises(error):
                    await kv.append_many([("fine", b"v"), (key, value)])
        with pytest.raises(TypeError):
            await kv.delete(2)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            kv.records_for(2.5)  # type: ignore[arg-type]
        assert await kv.append("12345678", b"v") == 1  # at the limit
        assert kv.last_lsn == 1
    bad_opts: list[dict[str, Any]] = [
        {"max_key_size": 0},
        {"max_key_size": 65536},
        {"max_key_size": True},
        {"snapshot_every": 0},
        {"snapshot_every": True},
    ]
    for opts in bad_opts:
        with pytest.raises(ValueError):
            walasync.open_keyed(log_dir, **opts)
    with pytest.raises(ValueError):
        walasync.open_keyed(log_dir, readonly=True)
    with pytest.raises(walasync.ClosedError):
        await kv.append("a", b"")


async def test_a_malformed_record_in_the_log_is_a_corruption_error(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir) as kv:
        await kv.append("a", b"1")
        await kv.wal.append(b"\x01\x00\x09\x00short")  # not through the keyed view
    with pytest.raises(MalformedRecordError) as info:
        await walasync.open_keyed(log_dir, snapshot_every=None)
    assert info.value.lsn == 2 and info.value.path == str(log_dir)
    async with walasync.open(log_dir) as wal:
        assert wal.last_lsn == 2  # the log was closed again, unharmed


@pytest.mark.parametrize(("data", "why"), MALFORMED)
async def test_every_malformed_record_is_a_corruption_error_at_open_and_when_read(
    log_dir: Path, data: bytes, why: str
) -> None:
    """Each malformation: at open, replaying after a snapshot or the whole log (the open's
    own decoder), and when `read`, `latest` or `records_for` reaches the record."""
    good = encode_record("a", b"3")
    async with walasync.open_keyed(log_dir) as kv:
        await kv.append("a", b"1")  # closing writes a snapshot at LSN 1
    assert (log_dir / INDEX_NAME).exists()
    async with walasync.open(log_dir) as wal:
        assert await wal.append(data) == 2  # around the keyed view
        assert await wal.append(good) == 3
        log_id = wal.log_id

    def named(err: MalformedRecordError) -> None:
        assert (err.lsn, err.path, err.offset) == (2, str(log_dir), -1)
        assert "LSN 2" in str(err) and why in str(err)

    for snapshot_every in (100_000, None):  # replay after the snapshot, then all of it
        with pytest.raises(MalformedRecordError) as info:
            await walasync.open_keyed(log_dir, snapshot_every=snapshot_every)
        named(info.value)
    assert not (log_dir / INDEX_NAME).exists()
    # A snapshot that says key "a" has records at 1 and 2 (and covers 3): open trusts it,
    # and the readers reach the malformed record.
    stamp = (log_id, crc32c(good), len(good))
    snap = encode_snapshot(as_index({"a": [1, 2]}).items(), 1, 3, stamp)
    (log_dir / INDEX_NAME).write_bytes(snap)
    async with walasync.open_keyed(log_dir) as kv:
        assert (kv.snapshot_lsn, kv.replayed, kv.latest_lsn("a")) == (3, 0, 2)
        with pytest.raises(MalformedRecordError) as info:
            await kv.latest("a")
        named(info.value)
        got: list[KeyedRecord] = []
        with pytest.raises(MalformedRecordError) as info:
            async for rec in kv.records_for("a"):
                got.append(rec)  # noqa: PERF401 - what came before the error counts
        named(info.value)
        assert got == [KeyedRecord(1, "a", b"1")]
        got = []
        with pytest.raises(MalformedRecordError) as info:
            async for rec in kv.read():
                got.append(rec)
        named(info.value)
        assert got == [KeyedRecord(1, "a", b"1")]
        [raw] = [r async for r in kv.wal.read(2, 2)]
        with pytest.raises(MalformedRecordError) as info:
            KeyedRecord.from_record(raw, str(log_dir))
        named(info.value)


# A record as raw bytes: a keyed record, a header of small fields with anything after it,
# or any few bytes.
raw_records = st.one_of(
    st.builds(encode_record, keys, st.one_of(st.none(), st.binary(max_size=8))),
    st.builds(
        lambda v, f, k, rest: bytes([v, f, k, 0]) + rest,
        st.integers(0, 2),
        st.integers(0, 7),
        st.integers(0, 6),
        st.binary(max_size=8),
    ),
    st.binary(max_size=6),
)


@loops
@settings(max_examples=40, deadline=None)
@given(records=st.lists(raw_records, min_size=1, max_size=6))
def test_any_records_are_indexed_at_open_or_raise_malformed(
    loop: str, records: list[bytes]
) -> None:
    """Whatever records a log holds, open indexes them (as `decode_record` reads them) or
    raises `MalformedRecordError` naming the first that is not a keyed record; nothing
    else."""
    decoded: list[KeyedRecord] = []
    bad: MalformedRecordError | None = None
    for lsn, data in enumerate(records, 1):
        try:
            decoded.append(KeyedRecord(lsn, *decode_record(data, lsn)))
        except MalformedRecordError as exc:  # noqa: PERF203 - the first one ends it
            bad = exc
            break

    async def main(path: Path) -> None:
        async with walasync.open(path) as wal:
            await wal.append_many(records)
        if bad is None:
            async with walasync.open_keyed(path, snapshot_every=None) as kv:
                assert await check(kv) == expected(decoded)
        else:
            with pytest.raises(MalformedRecordError) as info:
                await walasync.open_keyed(path, snapshot_every=None)
            assert info.value.lsn == bad.lsn
            assert str(info.value) == str(bad).replace(": LSN", f"{path}: LSN", 1)

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(Path(tmp) / "log"))


async def test_snapshot_then_open_replays_only_what_follows(log_dir: Path) -> None:
    rng = random.Random(3)
    async with walasync.open_keyed(log_dir, snapshot_every=10_000) as kv:
        for i in range(150):
            key = f"k{rng.randrange(40)}"
            await (kv.delete(key) if i % 17 == 0 else kv.append(key, b"%d" % i))
        assert kv.snapshot_lsn == 0
        assert await kv.snapshot() == 150
        assert await kv.snapshot() == 150  # nothing new: nothing written
        for i in range(25):
            await kv.append(f"k{i}", b"after")
        want = await check(kv)
        await kv.wal.close()  # as if killed: no snapshot at close
    async with walasync.open_keyed(log_dir) as kv:
        assert (kv.snapshot_lsn, kv.replayed) == (150, 25)
        assert await check(kv) == want
    async with walasync.open_keyed(log_dir) as kv:  # the close above wrote one at 175
        assert (kv.snapshot_lsn, kv.replayed) == (175, 0)
        assert await check(kv) == want
    async with walasync.open_keyed(log_dir, snapshot_every=None) as kv:
        assert kv.replayed == 175 and not (log_dir / INDEX_NAME).exists()
        assert await check(kv) == want


async def test_snapshots_are_written_in_the_background(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir, snapshot_every=50) as kv:
        seen = set()
        for i in range(2000):  # until a second one, however slowly they are written
            await kv.append(f"k{i % 7}", b"v")
            seen.add(kv.snapshot_lsn)
            if len(seen - {0}) == 2:
                break
        assert len(seen - {0}) == 2 and min(seen - {0}) >= 50
        assert (log_dir / INDEX_NAME).exists()


class FailingRename(SimulatedDisk):
    """A disk on which renaming onto KEYINDEX fails (no room), counting the attempts."""

    attempts = 0

    def rename(self, src: str, dst: str) -> None:
        if dst.endswith(INDEX_NAME):
            self.attempts += 1
            raise OSError(errno.ENOSPC, "no room")
        super().rename(src, dst)


async def test_a_failing_snapshot_is_retried_only_after_as_many_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = FailingRename.from_files({}, dirs=["/d"])
    assert isinstance(disk, FailingRename)
    with caplog.at_level(logging.WARNING, "walasync"):
        async with walasync.open_keyed("/d/log", io=disk, snapshot_every=20, **small()) as kv:
            for i in range(100):
                await kv.append(f"k{i % 3}", b"v")
            task = kv._snapshotter
            await until(lambda: task is not None and task.done(), "the last attempt to end")
            assert kv.snapshot_lsn == 0
            assert 1 <= disk.attempts <= 5  # at most one per 20 records, however slow
        assert disk.attempts <= 6  # and one at close
    assert "writing the key index snapshot failed" in caplog.text


@pytest.mark.parametrize(
    "damage", ["flip", "truncate", "empty", "other log", "ahead", "cut and regrown"]
)
async def test_a_bad_snapshot_is_ignored_and_deleted(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    log, other = tmp_path / "log", tmp_path / "other"
    async with walasync.open_keyed(log) as kv:
        for i in range(60):
            await kv.append(f"k{i % 9}", b"%d" % i)
        await kv.snapshot()
        await kv.wal.close()  # no snapshot at close
    snap = log / INDEX_NAME
    data = snap.read_bytes()
    if damage == "flip":
        snap.write_bytes(data[:100] + bytes([data[100] ^ 4]) + data[101:])
    elif damage == "truncate":
        snap.write_bytes(data[:-3])
    elif damage == "empty":
        snap.write_bytes(b"")
    elif damage == "other log":  # valid, of a log with the very same records
        async with walasync.open_keyed(other) as kv:
            for i in range(60):
                await kv.append(f"k{i % 9}", b"%d" % i)
        shutil.copy(other / INDEX_NAME, snap)
    else:  # this log, cut back under the snapshot (around the keyed view), maybe regrown
        async with walasync.open(log) as wal:
            await wal.truncate_back(50)
            if damage == "cut and regrown":
                for i in range(15):
                    await wal.append(encode_record(f"k{i % 4}", b"new %d" % i))
    with caplog.at_level(logging.WARNING, "walasync"):
        async with walasync.open_keyed(log) as kv:
            assert (kv.snapshot_lsn, kv.replayed) == (0, kv.last_lsn)
            assert not snap.exists()  # a stale snapshot must not outlive this opening
            await check(kv)
    assert "ignoring the key index snapshot" in caplog.text


async def test_truncate_front_and_retention_drop_keys_without_errors(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir, **small(retention_bytes=12_000)) as kv:
        for i in range(300):
            await kv.append(f"k{i % 50}" if i < 200 else "late", bytes(100))
        # retention dropped old segments: records_for and latest skip what is gone
        assert kv.first_lsn > 1
        assert await check(kv) == expected([r async for r in kv.read()])
        start = max(201, kv.first_lsn)
        assert start + 5 < 280
        got = []
        async for rec in kv.records_for("late"):  # one batch per record
            got.append(rec.lsn)
            if rec.lsn == start + 5:  # truncated under the reader: it skips, raises nothing
                await kv.truncate_front(280)
        assert got == [*range(start, start + 6), *range(280, 301)]
        assert kv.latest_lsn("k3") is None and "k3" not in kv
        assert await kv.latest("k3") is None
        assert kv.keys() == ["late"] and len(kv) == 1
        await check(kv)
        await kv.snapshot()
    async with walasync.open_keyed(log_dir, **small()) as kv:
        assert kv.keys() == ["late"]


async def test_a_truncated_key_is_gone_before_any_pruning(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir) as kv:
        await kv.append("old", b"1")
        await kv.append_many([("new", b"2"), ("both", b"3")])
        await kv.append("both", b"4")
        await kv.truncate_front(2)
        assert kv.latest_lsn("old") is None and "old" not in kv
        assert await kv.latest("old") is None
        assert [r async for r in kv.records_for("old")] == []
        assert [r.lsn async for r in kv.records_for("both")] == [3, 4]
        assert kv.keys() == ["new", "both"]


async def test_truncate_back_rebuilds_the_index(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir) as kv:
        for i in range(40):
            await kv.append(f"k{i % 4}", b"%d" % i)
        await kv.snapshot()
        await kv.delete("k1")  # 41
        await kv.append("k9", b"late")  # 42
        assert "k1" not in kv
        with pytest.raises(ValueError):
            await kv.truncate_back(99)
        assert await check(kv)
        await kv.truncate_back(30)  # the delete goes: k1 comes back; the snapshot (40) goes
        assert kv.snapshot_lsn == 0 and not (log_dir / INDEX_NAME).exists()
        assert "k1" in kv and "k9" not in kv
        assert await kv.latest("k1") == KeyedRecord(30, "k1", b"29")
        assert await kv.append("k9", b"again") == 31
        want = await check(kv)
        await kv.snapshot()
        await kv.truncate_back(31)  # a snapshot at the cut stays
        assert kv.snapshot_lsn == 31
    async with walasync.open_keyed(log_dir) as kv:
        assert kv.replayed == 0
        assert await check(kv) == want


async def test_appends_racing_truncate_back_leave_the_index_in_step(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir) as kv:
        for i in range(50):
            await kv.append(f"k{i % 5}", b"%d" % i)
        stop = False

        async def appender(n: int) -> None:
            i = 0
            while not stop:
                await kv.append(f"r{n}.{i % 3}", b"x")
                i += 1

        tasks = [asyncio.ensure_future(appender(n)) for n in range(8)]
        await until(lambda: kv.last_lsn > 80)
        await kv.truncate_back(60)
        await until(lambda: kv.last_lsn > 100)
        stop = True
        await asyncio.gather(*tasks)
        await kv.sync()
        await check(kv)


async def test_an_append_waits_for_a_gap_a_cancelled_append_left(log_dir: Path) -> None:
    """An appender cancelled once its record was queued never applies it; the next one
    returns only once its own record is in the index, so the gap is closed from the log."""
    async with walasync.open_keyed(log_dir) as kv:
        first = asyncio.ensure_future(kv.append("cancelled", b"1"))
        second = asyncio.ensure_future(kv.append("second", b"2"))
        await asyncio.sleep(0)  # both ran up to their wait: both records are queued
        assert kv.wal.last_lsn == 0
        first.cancel()
        async with cancel_after(20):
            assert await second == 2
        assert kv.latest_lsn("cancelled") == 1  # taken from the log
        assert await check(kv)
        assert first.cancelled()


async def test_cancelled_appenders_leave_the_index_in_step_with_the_log(log_dir: Path) -> None:
    rng = random.Random(5)
    async with walasync.open_keyed(log_dir) as kv:

        async def appender(n: int) -> None:
            for i in range(20):
                await kv.append(f"k{(n * 7 + i) % 23}", b"%d.%d" % (n, i))

        tasks = [asyncio.ensure_future(appender(n)) for n in range(64)]
        for _ in range(40):
            await asyncio.sleep(rng.random() / 500)
            rng.choice(tasks).cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await kv.sync()
        assert sum(t.cancelled() for t in tasks) > 5
        await check(kv)
        assert "parked=0" in repr(kv)


class FailingReads(walasync.FileIO):
    """The real I/O layer, with reads that fail (EIO) while `failing` is set."""

    failing = False

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if self.failing:
            raise OSError(errno.EIO, "injected read error")
        return super().pread(fd, size, offset)


@pytest.mark.parametrize("many", [False, True])
async def test_no_append_waits_for_ever_after_a_catch_up_failed(
    log_dir: Path, caplog: pytest.LogCaptureFixture, many: bool
) -> None:
    """A cancelled append leaves a gap, and the catch-up that would close it fails (a read
    error): an append waiting behind the gap gets that error rather than waiting for ever,
    and once reads work again the next one closes the gap itself."""
    io = FailingReads()

    async def put(key: str, value: bytes) -> int:
        if many:
            return (await kv.append_many([(key, value)]))[0]
        return await kv.append(key, value)

    with caplog.at_level(logging.WARNING, "walasync"):
        async with walasync.open_keyed(log_dir, io=io, snapshot_every=None) as kv:
            await put("a", b"1")
            io.failing = True
            cancelled = asyncio.ensure_future(put("cancelled", b"2"))
            await asyncio.sleep(0)  # its record is queued
            cancelled.cancel()
            await until(lambda: "catching up the key index failed" in caplog.text)
            async with cancel_after(15):
                with pytest.raises(walasync.WalError, match="injected read error"):
                    await put("b", b"3")  # durable, but the index cannot take it
                io.failing = False
                assert await put("c", b"4") == 4
            assert [kv.latest_lsn(k) for k in ("cancelled", "b", "c")] == [2, 3, 4]
            assert await check(kv)
            assert "parked=0" in repr(kv)


class HeldReads(walasync.FileIO):
    """The real I/O layer, whose reads, once `armed()` says so, wait for `release` and then
    fail (EIO)."""

    def __init__(self) -> None:
        self.armed: Callable[[], bool] = lambda: False
        self.entered, self.release = threading.Event(), threading.Event()

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if self.armed():
            self.entered.set()
            self.release.wait(30)
            raise OSError(errno.EIO, "injected read error")
        return super().pread(fd, size, offset)


async def test_an_append_parked_while_a_rebuild_fails_raises_broken_log_error(
    log_dir: Path,
) -> None:
    """An append acknowledged while `truncate_back` rebuilds the index parks; the rebuild
    fails (a read error): the append raises BrokenLogError, never hangs, never returns
    with its record missing from the index."""
    io = HeldReads()
    async with walasync.open_keyed(log_dir, io=io, snapshot_every=None) as kv:
        for i in range(10):
            await kv.append(f"k{i % 3}", b"%d" % i)
        gen = kv._gen
        io.armed = lambda: kv._gen != gen  # the log is cut: the rebuild's reads
        cut = asyncio.ensure_future(kv.truncate_back(5))
        await until(io.entered.is_set, "the rebuild to read")
        late = asyncio.ensure_future(kv.append("late", b"x"))
        await until(lambda: "parked=1" in repr(kv), "the late append to park")
        io.release.set()
        async with cancel_after(15):
            with pytest.raises(walasync.BrokenLogError, match="injected read error") as cut_info:
                await cut
            assert isinstance(cut_info.value.__cause__, walasync.WalError)
            with pytest.raises(walasync.BrokenLogError) as info:
                await late
        assert info.value.__cause__ is not None
        assert "broken" in repr(kv) and kv.last_lsn == 6


async def test_a_keyed_record_appended_around_the_view_is_taken_from_the_log(
    log_dir: Path,
) -> None:
    async with walasync.open_keyed(log_dir) as kv:
        await kv.append("a", b"1")
        await kv.wal.append(encode_record("b", b"around"))  # misuse, but a keyed record
        async with cancel_after(15):
            assert await kv.append("a", b"2") == 3
        assert kv.latest_lsn("b") == 2
        assert await check(kv) == {"a": [(1, b"1"), (3, b"2")], "b": [(2, b"around")]}


@pytest.mark.parametrize("many", [False, True])
async def test_a_malformed_record_appended_around_the_view_fails_the_appends_behind_it(
    log_dir: Path, many: bool
) -> None:
    """The appends waiting behind it raise MalformedRecordError; the view is then broken
    (later appends write nothing), reads go on, and reopening raises it at open."""
    async with walasync.open_keyed(log_dir) as kv:
        await kv.append("a", b"1")
        await kv.wal.append(b"\x01\x00\x00")
        async with cancel_after(15):
            with pytest.raises(MalformedRecordError) as info:
                if many:
                    await kv.append_many([("a", b"2"), ("b", b"3")])
                else:
                    await kv.append("a", b"2")
        assert info.value.lsn == 2 and "short of a keyed header" in str(info.value)
        last = kv.last_lsn
        for call in (kv.append("a", b"4"), kv.append_many([("a", b"4")]), kv.sync()):
            with pytest.raises(walasync.BrokenLogError) as broken:
                await call
            assert broken.value.__cause__ is info.value
        assert kv.last_lsn == last and "broken" in repr(kv) and "parked=0" in repr(kv)
        assert await kv.latest("a") == KeyedRecord(1, "a", b"1")
    with pytest.raises(MalformedRecordError) as info:
        await walasync.open_keyed(log_dir)
    assert info.value.lsn == 2


async def test_nothing_waits_for_the_index_once_closing_caught_up(log_dir: Path) -> None:
    """An appender that would park behind a gap after close() caught up (its wakeup
    delayed somehow) does not wait: nobody would close the gap any more."""
    kv = await walasync.open_keyed(log_dir)
    await kv.append("a", b"1")
    await kv.close()
    async with cancel_after(15):
        await kv._until(kv.last_lsn + 5)


async def test_read_follows_and_decodes(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir) as kv:
        got: list[KeyedRecord] = []

        async def follow() -> None:
            async for rec in kv.read(follow=True):
                got.append(rec)  # noqa: PERF401 - the test watches it grow

        task = asyncio.ensure_future(follow())
        await kv.append("a", b"1")
        await kv.delete("a")
        await until(lambda: len(got) == 2)
    await task
    assert got == [KeyedRecord(1, "a", b"1"), KeyedRecord(2, "a", None)]


async def test_many_concurrent_appenders_keep_the_index_in_lsn_order(log_dir: Path) -> None:
    async with walasync.open_keyed(log_dir, snapshot_every=100) as kv:

        async def appender(n: int) -> None:
            for i in range(8):
                if i == 5 and n % 3 == 0:
                    await kv.delete(f"k{n % 10}")
                else:
                    await kv.append(f"k{(n + i) % 10}", b"%d.%d" % (n, i))

        await asyncio.gather(*(appender(n) for n in range(256)))
        assert kv.last_lsn == 256 * 8
        want = await check(kv)
    async with walasync.open_keyed(log_dir) as kv:
        assert await check(kv) == want


def test_memory_of_a_key_with_one_record_is_one_int() -> None:
    """The index keeps one int for a key with one record, an array for more (the memory
    per key the README quotes)."""
    from array import array

    back = decode_snapshot(
        encode_snapshot(as_index({b"a": [1], b"b": [2, 3]}).items(), 1, 9, (LOG_ID, 0, 0))
    )
    index = back[2]
    assert type(index[b"a"]) is int and type(index[b"b"]) is array


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path: Path) -> Any:
    yield
    for root, _dirs, files in os.walk(tmp_path):
        assert "KEYINDEX.tmp" not in files, root
