"""`walasync.verify` and `walasync.describe` against the code they must agree with.

- Any bit flipped anywhere in any segment: verify is sound exactly when the whole log reads
  back (a prefix of it when the flip hit the last segment's last batch, which open takes for
  a torn write); otherwise it names the file and offset where open or a read fails, and
  `repair` leaves exactly the records before it.
- Every crash image of a workload with rotations, retention, recycling, truncate_front and
  truncate_back (FSYNC mode, so no image is damaged): verify finds no problem, and it and
  describe give the first and last LSN that opening the image gives.
- Neither ever writes.
"""

from __future__ import annotations

import asyncio
import posixpath
import random
from pathlib import Path

from conftest import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_readonly import NeverWrites

import walasync
from walasync.testing import SimulatedDisk

ROOT = "/data"
LOG = "/data/log"


def data(i: int) -> bytes:
    return b"v%d|" % i + bytes(i * 13 % 120)


def build() -> tuple[dict[str, bytes], int]:
    disk = SimulatedDisk.from_files({}, dirs=[ROOT])

    async def write() -> int:
        async with walasync.open(LOG, io=disk, segment_size=4096) as wal:
            for i in range(1, 151, 2):
                await wal.append_many([data(i), data(i + 1)])
            return wal.last_lsn

    last = run("asyncio", write())
    return disk.files(LOG), last


BASE, LAST = build()
SEGMENTS = sorted(n for n in BASE if n.endswith(".wal"))
ORIGINAL = [walasync.Record(i, data(i)) for i in range(1, LAST + 1)]


def disk_of(files: dict[str, bytes]) -> SimulatedDisk:
    return SimulatedDisk.from_files({posixpath.join(LOG, n): d for n, d in files.items()})


async def read_all(disk: SimulatedDisk) -> tuple[list[walasync.Record], Exception | None]:
    """What opening the log and reading it all gives: records, then the error if any."""
    records: list[walasync.Record] = []
    try:
        async with walasync.open(LOG, io=disk) as wal:
            async for record in wal.read():
                records.append(record)  # noqa: PERF401 - kept up to the error
    except walasync.CorruptionError as exc:
        return records, exc
    return records, None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SEGMENTS) - 1), st.integers(0, 1 << 20), st.integers(0, 7))
def test_verify_agrees_with_the_readers_about_any_flipped_bit(
    which: int, where: int, bit: int
) -> None:
    name = SEGMENTS[which]
    raw = bytearray(BASE[name])
    offset = where % len(raw)
    raw[offset] ^= 1 << bit
    disk = disk_of({**BASE, name: bytes(raw)})
    report = walasync.verify(LOG, io=disk)
    records, error = run("asyncio", read_all(disk_of({**BASE, name: bytes(raw)})))
    if report.ok:
        assert error is None, f"verify found nothing, but reading failed: {error}"
        assert records == ORIGINAL[: len(records)]
        assert len(records) == LAST or name == SEGMENTS[-1]
        assert report.last_lsn == len(records)
        return
    problem = report.problem
    assert problem is not None
    assert isinstance(error, walasync.CorruptionError), f"{problem}, but the log reads back"
    assert (error.path, error.offset) == (problem.path, problem.offset)
    assert records == ORIGINAL[: len(records)] and len(records) <= problem.lsn - 1

    repaired = walasync.repair(LOG, io=disk)
    assert repaired.problems[0] == problem and repaired.cut_from == problem.lsn
    assert walasync.verify(LOG, io=disk).ok
    records, error = run("asyncio", read_all(disk))
    assert error is None and records == ORIGINAL[: problem.lsn - 1]


def test_verify_and_describe_agree_with_open_on_every_crash_image() -> None:
    disk = SimulatedDisk.from_files({}, dirs=[ROOT])
    rng = random.Random(5)
    images: dict[tuple[tuple[str, bytes], ...], SimulatedDisk] = {}

    def capture(step: int, op: str) -> None:
        for mode in ("drop", "torn"):
            image = disk.crash(mode, rng)
            if "log" in image.listdir(ROOT):
                images.setdefault(tuple(sorted(image.files(LOG).items())), image)

    async def workload() -> None:
        opts = {"segment_size": 4096, "retention_bytes": 3 * 4096}
        async with walasync.open(LOG, io=disk, **opts) as wal:  # type: ignore[call-overload]
            for phase in range(3):

                async def appender(i: int, phase: int = phase) -> None:
                    for j in range(8):  # four at once: batches of several records
                        await wal.append(b"%d.%d.%d|" % (phase, i, j) + bytes(j * 50))

                await asyncio.gather(*(appender(i) for i in range(4)))
                await wal.truncate_back(wal.last_lsn - rng.randint(1, 12))
                await wal.truncate_front(wal.first_lsn + rng.randint(1, 10))

    disk.on_step = capture
    run("asyncio", workload())
    disk.on_step = None
    assert len(images) > 40

    async def check_all() -> None:
        for n, image in enumerate(images.values()):
            if not any(name.endswith(".wal") for name in image.files(LOG)):
                continue  # before the first segment was durable: no log yet
            report = await asyncio.to_thread(walasync.verify, LOG, io=image)
            info = await asyncio.to_thread(walasync.describe, LOG, io=image)
            assert report.ok and not info.problems, (report.problem, info.problems)
            if n % 6 and not info.pending_cut:
                continue  # opening costs: all those in a cut, a sixth of the others
            async with walasync.open(LOG, io=image) as wal:
                expected = (wal.first_lsn, wal.last_lsn)
            assert (report.first_lsn, report.last_lsn) == expected, report
            assert (info.first_lsn, info.last_lsn) == expected, info

    run("asyncio", check_all())


def test_verify_and_describe_never_write(tmp_path: Path) -> None:
    async def write() -> None:
        async with walasync.open(tmp_path, segment_size=4096) as wal:
            for i in range(1, 101):
                await wal.append(data(i))

    run("asyncio", write())
    segments = sorted(tmp_path.glob("*.wal"))
    raw = bytearray(segments[1].read_bytes())
    raw[60] ^= 1
    segments[1].write_bytes(bytes(raw))
    report = walasync.verify(tmp_path, io=NeverWrites())
    assert report.problem is not None and report.problem.path == str(segments[1])
    info = walasync.describe(tmp_path, io=NeverWrites())
    assert (info.first_lsn, info.last_lsn, len(info.segments)) == (1, 100, len(segments))
    assert walasync.repair(tmp_path, io=NeverWrites(), dry_run=True).cut_from == (
        report.problem.lsn
    )
